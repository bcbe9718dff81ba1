"""A float32 image in Hounsfield units that shapes are painted onto, in millimetres.

Shapes are given in the *body frame* of the slice (millimetres, origin at the body centre, u to the
patient's left, v posterior) and painted into pixels through one rigid transform (the patient's small
rotation). Every shape touches only the pixels of its bounding box, so a slice costs a few hundred
small numpy operations whatever the image size.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Canvas"]


class Canvas:
    """Paint ellipses, thick polylines and layered outlines onto one axial image."""

    def __init__(self, size: int, origin: tuple[float, float], spacing: float) -> None:
        self.size = size
        self.x0, self.y0 = origin
        self.dx = spacing
        self.img = np.full((size, size), -1000.0, dtype=np.float32)
        self._ox = 0.0
        self._oy = 0.0
        self._phi = 0.0
        self._c = 1.0
        self._s = 0.0

    def set_frame(self, origin_x: float, origin_y: float, phi_rad: float) -> None:
        """Body frame: (u, v) maps to patient (x, y) = origin + R(phi) (u, v)."""
        self._ox, self._oy, self._phi = origin_x, origin_y, phi_rad
        self._c, self._s = math.cos(phi_rad), math.sin(phi_rad)

    def to_patient(self, u: float, v: float) -> tuple[float, float]:
        """Body-frame point to patient (x, y) in mm."""
        return self._ox + self._c * u - self._s * v, self._oy + self._s * u + self._c * v

    def _to_px(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._ox + self._c * u - self._s * v
        y = self._oy + self._s * u + self._c * v
        return (x - self.x0) / self.dx, (y - self.y0) / self.dx

    def _box(self, ci: float, cj: float, r: float) -> tuple[int, int, int, int] | None:
        n = self.size
        i0, i1 = max(int(ci - r), 0), min(int(ci + r) + 2, n)
        j0, j1 = max(int(cj - r), 0), min(int(cj + r) + 2, n)
        if i0 >= i1 or j0 >= j1:
            return None
        return i0, i1, j0, j1

    def ellipse(
        self,
        u: float,
        v: float,
        a: float,
        b: float,
        value: float,
        angle: float = 0.0,
        above: float | None = None,
        below: float | None = None,
    ) -> None:
        """Fill an ellipse with semi-axes a (along u turned by ``angle`` radians) and b.

        ``above`` / ``below`` keep only the part anterior / posterior of a horizontal line at body-frame
        v (gravity acts along patient y, so this draws air-fluid levels).
        """
        if a <= 0.05 or b <= 0.05:
            return
        ci, cj = self._to_px(np.float64(u), np.float64(v))
        box = self._box(float(ci), float(cj), max(a, b) / self.dx + 1.0)
        if box is None:
            return
        i0, i1, j0, j1 = box
        xs = ((np.arange(i0, i1, dtype=np.float32) - ci) * self.dx)[None, :]
        ys = ((np.arange(j0, j1, dtype=np.float32) - cj) * self.dx)[:, None]
        th = angle + self._phi
        c, s = math.cos(th), math.sin(th)
        lx = (c * xs + s * ys) / a
        ly = (c * ys - s * xs) / b
        mask = lx * lx + ly * ly <= 1.0
        if above is not None or below is not None:
            line = above if above is not None else below
            level = self._oy + self._s * u + self._c * float(line)  # type: ignore[arg-type]
            yy = ys + (float(cj) * self.dx + self.y0)
            mask &= (yy < level) if above is not None else (yy >= level)
        np.copyto(self.img[j0:j1, i0:i1], np.float32(value), where=mask)

    def polyline(self, points: np.ndarray, radius: np.ndarray | float, value: float) -> None:
        """Fill every pixel within ``radius`` (per segment, or one value) of a body-frame polyline."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or len(pts) == 0:
            return
        if len(pts) == 1:
            r = float(np.max(radius))
            self.ellipse(pts[0, 0], pts[0, 1], r, r, value)
            return
        pi, pj = self._to_px(pts[:, 0], pts[:, 1])
        rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pts) - 1,)) / self.dx
        rmax = float(rad.max()) + 1.0
        n = self.size
        i0, i1 = max(int(pi.min() - rmax), 0), min(int(pi.max() + rmax) + 2, n)
        j0, j1 = max(int(pj.min() - rmax), 0), min(int(pj.max() + rmax) + 2, n)
        if i0 >= i1 or j0 >= j1:
            return
        gi = np.arange(i0, i1, dtype=np.float32)[None, :, None]
        gj = np.arange(j0, j1, dtype=np.float32)[:, None, None]
        ai, aj = pi[:-1].astype(np.float32), pj[:-1].astype(np.float32)
        di, dj = (pi[1:] - pi[:-1]).astype(np.float32), (pj[1:] - pj[:-1]).astype(np.float32)
        len2 = np.maximum(di * di + dj * dj, 1e-6)
        t = np.clip(((gi - ai) * di + (gj - aj) * dj) / len2, 0.0, 1.0)
        ei = gi - ai - t * di
        ej = gj - aj - t * dj
        inside = (ei * ei + ej * ej) <= (rad * rad).astype(np.float32)
        mask = inside.any(axis=2)
        np.copyto(self.img[j0:j1, i0:i1], np.float32(value), where=mask)

    def body(self, a: float, b: float, layers: list[tuple[float, float] | tuple[float, float, float]]) -> None:
        """Nested outlines of the body wall: an ellipse anteriorly, a flatter superellipse at the back.

        Args:
            a: Outer semi-axis along u (mm).
            b: Outer semi-axis along v (mm).
            layers: (inset in mm, HU) from the outside in; each is the outline shrunk by ``inset``. A
                third value ``v_max`` (mm) paints the layer only anterior of body-frame v = v_max (the
                abdominal wall muscles, which do not go round the back).
        """
        ci, cj = self._to_px(np.float64(0.0), np.float64(0.0))
        box = self._box(float(ci), float(cj), max(a, b) / self.dx * 1.2 + 2)
        if box is None:
            return
        i0, i1, j0, j1 = box
        xs = ((np.arange(i0, i1, dtype=np.float32) - ci) * self.dx)[None, :]
        ys = ((np.arange(j0, j1, dtype=np.float32) - cj) * self.dx)[:, None]
        uu = self._c * xs + self._s * ys
        vv = self._c * ys - self._s * xs
        u2, v2 = uu * uu, vv * vv
        back = (vv > 0).astype(np.float32)
        view = self.img[j0:j1, i0:i1]
        for layer in layers:
            inset, value = layer[0], layer[1]
            aa, bb = a - inset, b - inset
            if aa <= 1 or bb <= 1:
                break
            x2 = u2 * np.float32(1.0 / (aa * aa))
            y2 = v2 * np.float32(1.0 / (bb * bb))
            r = x2 + y2
            # p = 2 in front; halfway to p = 4 at the back (flat where the patient lies on the table)
            x2 *= x2
            y2 *= y2
            x2 += y2
            x2 -= r
            x2 *= back
            x2 *= 0.5
            r += x2
            where = r <= 1.0
            if len(layer) > 2:
                where &= vv <= np.float32(layer[2])
            np.copyto(view, np.float32(value), where=where)
