"""Procedural anatomy: the Hounsfield-unit image of one axial slice of a :class:`StudySpec`.

Everything is drawn in the body frame of the slice (origin at the body centre, u to the patient's left,
v posterior, millimetres) from landmark tables interpolated along z, so neighbouring slices agree and a
sagittal reconstruction shows a continuous spine. Values are typical unenhanced / enhanced HU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from spinelevel.phantom.canvas import Canvas
from spinelevel.phantom.spec import StudySpec, Vertebra

__all__ = ["Anatomy", "add_noise", "noise_bank", "render_slice"]

_FAT = -95.0
_MUSCLE = 50.0
_SKIN = 35.0
_CSF = 12.0
_CORD = 35.0
_CORTEX = 750.0
_LUNG = -850.0
_AIR = -1000.0
_RIB_BAND = 11.0  # cranio-caudal height of a rib (mm)

# (organ, phase) -> HU; phases: none, arterial, portal_venous, delayed
_ENHANCE = {
    "blood": (40.0, 320.0, 170.0, 110.0),
    "vein": (40.0, 70.0, 160.0, 110.0),
    "liver": (58.0, 75.0, 115.0, 95.0),
    "spleen": (48.0, 125.0, 120.0, 100.0),
    "kidney_cortex": (32.0, 190.0, 160.0, 130.0),
    "kidney_medulla": (30.0, 80.0, 150.0, 130.0),
    "pancreas": (42.0, 110.0, 95.0, 80.0),
    "bowel_wall": (40.0, 90.0, 80.0, 65.0),
    "myocardium": (45.0, 110.0, 100.0, 85.0),
    "muscle": (50.0, 55.0, 60.0, 58.0),
}
_PHASES = ("none", "arterial", "portal_venous", "delayed")


def _interp(z: float, zs: np.ndarray, values: np.ndarray) -> float:
    # landmark tables are superior first; np.interp wants ascending x
    return float(np.interp(z, zs[::-1], values[::-1]))


def _profile(z: float, top: float, bottom: float) -> float:
    """Ellipsoid-like size factor: 0 outside [bottom, top], 1 in the middle."""
    if not bottom < z < top:
        return 0.0
    t = (2.0 * z - top - bottom) / (top - bottom)
    return math.sqrt(max(0.0, 1.0 - t * t))


def _ramp(z: float, z0: float, z1: float) -> float:
    """0 at z0, 1 at z1, linear, clipped (z0 and z1 in any order)."""
    if z0 == z1:
        return 1.0
    return min(1.0, max(0.0, (z - z0) / (z1 - z0)))


@dataclass(frozen=True)
class _Tube:
    top: float
    bottom: float
    u: float  # normalised cavity position (-1..1)
    v: float
    amp_u: float
    amp_v: float
    freq: float
    phase: float
    radius: float
    content: str  # 'fluid', 'contrast', 'air', 'stool'


class Anatomy:
    """The precomputed anatomy of one study; :meth:`render` paints one slice."""

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.phase = _PHASES.index(spec.contrast)
        self.cortex = spec.cortex_hu
        rng = np.random.default_rng(spec.anatomy_seed)
        vs = spec.vertebrae
        self.vert = {v.name: v for v in vs}
        self.tops = np.array([v.top_z for v in vs])
        self.bottoms = np.array([v.bottom_z for v in vs])
        self.lumbar = [v for v in vs if v.kind == "lumbar"]
        v = self.vert
        c = {name: (x.top_z + x.bottom_z) / 2 for name, x in v.items()}
        self.center = c
        s = spec
        fh = s.femoral_head_z
        a0, b0 = s.half_width, s.half_depth
        ach = a0 * s.chest_scale
        bch = ach * 0.66 + 0.2 * s.fat_mm
        # body outline landmarks along z (superior first)
        self.zl = np.array([v["T1"].top_z + 40, v["T1"].top_z, c["T6"], c["T11"], c["L3"], s.iliac_crest_z, fh, fh - 150])
        self.a_tab = np.array([0.78 * ach, 0.8 * ach, ach, 0.98 * ach, a0, a0 * 1.03, a0 * s.hip_scale, a0 * s.hip_scale])
        self.b_tab = np.array([0.72 * bch, 0.74 * bch, bch, 1.02 * bch, b0, 0.97 * b0, 0.9 * b0, 0.88 * b0])
        self.fat_tab = s.fat_mm * np.array([0.45, 0.45, 0.55, 0.8, 1.0, 1.0, 0.95, 0.95])
        self.mus_tab = s.muscle_mm * np.array([1.6, 1.6, 1.3, 1.0, 1.0, 1.1, 1.2, 1.2])
        # distance from the posterior muscle surface to the vertebral body centre
        lum_last = self.lumbar[-1].name
        ds = (s.half_width / 155.0) ** 0.3 * s.muscle_scale ** 0.3
        self.zd = np.array([v["T1"].top_z + 40, c["T1"], c["T6"], c["T12"], c["L3"], c[lum_last], c["S1"], c["S3"], c["S5"], c["Co"], fh - 150])
        self.d_tab = ds * np.array([46, 48, 54, 62, 76, 74, 64, 46, 32, 24, 24], dtype=np.float64)
        self.z_t1, self.z_s1 = v["T1"].top_z, v["S1"].top_z
        # organs along z
        # (organ_spread widens these ranges; rng.uniform(a, b) is a + (b - a) * one draw, so the draws
        # and everything after them stay those of the seed)
        sp = s.organ_spread
        self.lung_bottom = c["T12"] + rng.uniform(-10 - 15 * sp, 10 + 15 * sp)
        self.dome_r = c["T9"] + rng.uniform(-10 - 15 * sp, 10 + 15 * sp)
        self.dome_l = self.dome_r - rng.uniform(8, 20)
        self.liver_bottom = v["L2"].bottom_z - rng.uniform(-10 - 20 * sp, 25 + 35 * sp)
        self.heart = (c["T5"], c["T10"] + rng.uniform(-5, 10))
        kid_top = c["T12"] + rng.uniform(-10 - 30 * sp, 10 + 15 * sp)
        kid_len = rng.uniform(95, 120)
        self.kidney_l = (kid_top, kid_top - kid_len)
        drop = rng.uniform(8, 25)
        self.kidney_r = (kid_top - drop, kid_top - drop - kid_len * rng.uniform(0.95, 1.05))
        self.bladder = (fh + rng.uniform(25, 60), fh - 40)
        self.gallbladder = rng.random() < 0.7
        self.fh_x = a0 * s.hip_scale * 0.58 + rng.uniform(-5, 5)
        self.fh_r = rng.uniform(22, 26)
        self.acetabulum_roof = fh + self.fh_r + 8
        self.tubes = self._bowel(rng)
        self.vessels = [(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.2, 1.5), rng.uniform(1.0, 2.5),
                         rng.uniform(0.02, 0.06), rng.uniform(0, 6.3)) for _ in range(40)]
        self.ribs = [self._rib(k, side) for k in range(1, 13) for side in (-1.0, 1.0)]
        self._back_muscle = 0.0
        # realism details (their own seed, so the draws above stay what they were for a seed)
        real = np.random.default_rng(spec.real_seed)
        self.tubes += self._more_bowel(real)
        self.bubbles = [real.uniform((0.0, 0.0, 1.2), (6.3, 0.85, 3.2), size=(int(real.integers(6, 15)), 3)) for _ in self.tubes]
        # second realism round (again its own seed): fat streaks of the paraspinal muscles, per side
        # (u, v centre as fractions of the muscle's semi-axes, half-length fraction, angle, width mm)
        real2 = np.random.default_rng(spec.real2_seed)
        self.streaks = [real2.uniform((-0.6, -0.6, 0.25, -0.7, 0.7), (0.6, 0.6, 0.6, 0.7, 1.8), size=(6, 5)) for _ in range(2)]

    # --- per-slice frame ---------------------------------------------------------------------------

    def frame(self, z: float) -> dict[str, float]:
        """Outline and spine position of the slice at z, in the body frame."""
        a = _interp(z, self.zl, self.a_tab)
        b = _interp(z, self.zl, self.b_tab)
        fat = _interp(z, self.zl, self.fat_tab)
        mus = _interp(z, self.zl, self.mus_tab)
        ac = a - 2.0 - fat - mus
        bc = b - 2.0 - fat - mus
        back = b - 2.0 - 0.6 * fat
        sy = back - _interp(z, self.zd, self.d_tab)
        frac = (self.z_t1 - z) / max(self.z_t1 - self.z_s1, 1.0)
        sx = self.spec.scoliosis_mm * math.sin(math.pi * min(max(frac, 0.0), 1.0))
        return {"a": a, "b": b, "fat": fat, "mus": mus, "ac": ac, "bc": bc, "back": back, "sx": sx, "sy": sy}

    # --- precomputed details -----------------------------------------------------------------------

    def _bowel(self, rng: np.random.Generator) -> list[_Tube]:
        v, c = self.vert, self.center
        tubes: list[_Tube] = []
        top, bottom = v["L1"].top_z, v["S4"].bottom_z
        oral = self.spec.oral_contrast
        for _ in range(55):
            t = rng.uniform(bottom, top)
            length = rng.uniform(40, 160)
            content = "contrast" if oral and rng.random() < 0.6 else ("air" if rng.random() < 0.15 else "fluid")
            tubes.append(_Tube(t + length / 2, t - length / 2, rng.uniform(-0.62, 0.62), rng.uniform(-0.75, -0.05),
                               rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0.01, 0.04),
                               rng.uniform(0, 6.3), rng.uniform(9, 15), content))
        colon = lambda: "stool" if rng.random() < 0.6 else "air"  # noqa: E731
        tubes.append(_Tube(c["L1"], c["S1"], -0.70, -0.05, 0.02, 0.02, 0.01, 0.0, rng.uniform(18, 26), colon()))
        tubes.append(_Tube(c["T12"], v["L5"].bottom_z, 0.72, 0.05, 0.02, 0.02, 0.01, 1.0, rng.uniform(14, 19), colon()))
        tubes.append(_Tube(v["S1"].top_z, v["S3"].bottom_z, 0.35, -0.2, 0.15, 0.1, 0.03, 2.0, rng.uniform(14, 18), colon()))
        return tubes

    def _more_bowel(self, rng: np.random.Generator) -> list[_Tube]:
        """Extra small-bowel loops: collapsed (soft tissue), fluid-filled or with gas, of varied calibre."""
        v = self.vert
        top, bottom = v["L1"].top_z, v["S3"].bottom_z
        tubes: list[_Tube] = []
        for _ in range(self.spec.bowel_loops):
            t = rng.uniform(bottom, top)
            length = rng.uniform(30, 120)
            x = rng.random()
            content = "air" if x < self.spec.bowel_gas else ("collapsed" if x < self.spec.bowel_gas + 0.3 else "fluid")
            tubes.append(_Tube(t + length / 2, t - length / 2, rng.uniform(-0.7, 0.7), rng.uniform(-0.8, 0.0),
                               rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0.01, 0.05),
                               rng.uniform(0, 6.3), rng.uniform(5, 13), content))
        for _ in range(int(rng.integers(0, 4))):  # redundant or sagging colon: wide, with stool or gas
            t = rng.uniform(bottom, top)
            length = rng.uniform(30, 90)
            tubes.append(_Tube(t + length / 2, t - length / 2, rng.uniform(-0.6, 0.6), rng.uniform(-0.75, -0.3),
                               rng.uniform(0.02, 0.1), rng.uniform(0.02, 0.08), rng.uniform(0.01, 0.03),
                               rng.uniform(0, 6.3), rng.uniform(15, 24), "stool" if rng.random() < 0.7 else "air"))
        return tubes

    def _rib(self, k: int, side: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Centre line of rib k as (points (n, 2) in the body frame at the rib head, z (n,), cartilage start)."""
        vert = self.vert[f"T{k}"]
        z_head = vert.top_z - 0.25 * vert.height
        f = self.frame(z_head)
        cr_x, cr_y = 8.0, 7.0
        p0 = (side * vert.half_width * 0.9, f["sy"] + 0.2 * vert.half_depth)
        p1 = (side * (cr_x + 26.0), f["sy"] + vert.half_depth + cr_y + 10.0)
        a_wall = max(f["ac"] - 5.0, 40.0) * (0.75 if k == 1 else 0.9 if k == 2 else 1.0)
        post, ant = p1[1] + 6.0, -f["bc"] + 8.0
        vc, bb = (post + ant) / 2.0, (post - ant) / 2.0
        th0 = math.asin(min(abs(p1[0]) / a_wall, 0.95))
        th1 = {11: 0.62 * math.pi, 12: 0.45 * math.pi}.get(k, math.pi - (0.12 if k <= 7 else 0.45))
        th = np.linspace(th0, th1, 90)
        wall = np.stack([side * a_wall * np.sin(th), vc + bb * np.cos(th)], axis=1)
        neck = np.array([p0, p1])
        pts = np.concatenate([neck, wall], axis=0)
        drop = {1: 22.0, 2: 38.0, 3: 50.0, 11: 40.0, 12: 28.0}.get(k, 62.0) * (self.spec.half_width / 155.0) ** 0.5
        frac = (th - th0) / (th1 - th0)
        if k >= 11:
            # floating ribs: the head articulates with the body alone (no tubercle on a transverse
            # process), and neck and shaft slope steeply down, so no slice holds the long neck bar
            # of a typical rib (real T11-T12 slices show the head by the body and short pieces)
            z = np.concatenate([[z_head, z_head - 10.0], z_head - 12.0 - drop * frac])
        else:
            z = np.concatenate([[z_head + 2.0, z_head], z_head - 3.0 - drop * frac**1.5])
        cart = 0.78 if k <= 10 else 2.0
        return pts, z, cart

    # --- rendering ---------------------------------------------------------------------------------

    def hu(self, organ: str) -> float:
        return _ENHANCE[organ][self.phase]

    def render(self, z: float) -> np.ndarray:
        """Clean HU image (float32, size x size) of the slice whose centre is at z."""
        s = self.spec
        cv = Canvas(s.size, s.origin, s.pixel_spacing)
        f = self.frame(z)
        self._table(cv)
        cv.set_frame(*self._origin(f))
        a, b = f["a"], f["b"]
        muscle = self.hu("muscle")
        # below the chest the wall muscles (rectus, obliques, transversus) stop at the flank: behind
        # them subcutaneous fat meets the paraspinal muscles and quadratus lumborum
        c = self.center
        back = 1.5 + (s.wall_back - 1.5) * _ramp(z, c["T11"], c["L1"])
        cv.body(a, b, [(0.0, _SKIN), (2.0, _FAT + 5.0), (2.0 + f["fat"], muscle, back * b), (2.0 + f["fat"] + f["mus"], _FAT)])
        self._muscles(cv, z, f)
        self._thorax(cv, z, f)
        self._abdomen(cv, z, f)
        self._pelvis_soft(cv, z, f)
        self._back_muscle = f["back"] - 3.0
        self._spine(cv, z, f)
        self._ribs(cv, z, f)
        self._pelvis_bone(cv, z, f)
        return cv.img

    def _origin(self, f: dict[str, float]) -> tuple[float, float, float]:
        # body frame: origin at the body centre; the patient turns about the midline of the table top
        s = self.spec
        phi = math.radians(s.rotation_deg)
        px, py = s.body_x, s.table_y
        ox, oy = s.body_x, s.table_y - f["b"] - 1.0
        cx = px + math.cos(phi) * (ox - px) - math.sin(phi) * (oy - py)
        cy = py + math.sin(phi) * (ox - px) + math.cos(phi) * (oy - py)
        return cx, cy, phi

    def spine_center(self, z: float) -> tuple[float, float]:
        """Patient (x, y) in mm of the vertebral body centre line at z."""
        f = self.frame(z)
        cx, cy, phi = self._origin(f)
        c, s = math.cos(phi), math.sin(phi)
        return cx + c * f["sx"] - s * f["sy"], cy + s * f["sx"] + c * f["sy"]

    def _table(self, cv: Canvas) -> None:
        s = self.spec
        y = s.table_y
        n = s.size
        xs = s.origin[0] + np.arange(n) * s.pixel_spacing
        ys = s.origin[1] + np.arange(n) * s.pixel_spacing
        # a flat carbon table: thin dense shells around a foam core, fixed to the scanner (not rotated)
        inside_x = np.abs(xs - s.body_x) < 235.0
        # a cradle table rises at its sides (radius 700 mm), a flat one does not
        lift = ((xs - s.body_x) ** 2 / 1400.0)[None, :] if s.table_curved else np.zeros((1, n))
        yy = ys[:, None] + lift
        rows = (yy >= y) & (yy < y + 45.0) & inside_x[None, :]
        cv.img[rows] = -850.0
        shell = (((yy >= y) & (yy < y + 3.0)) | ((yy >= y + 42.0) & (yy < y + 45.0))) & inside_x[None, :]
        cv.img[shell] = 180.0

    def _muscles(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        s, v = self.spec, self.vert
        sx, sy = f["sx"], f["sy"]
        ms = s.muscle_scale
        m = self.hu("muscle")
        # paraspinal (erector spinae, multifidus): grow from the chest to the lumbar spine
        size = _interp(z, self.zd, np.array([14, 15, 17, 21, 28, 28, 24, 15, 8, 4, 0.0])) * ms
        if size > 1:
            d = self._depth(z)
            top_v = sy + d + 6.0
            bot_v = f["back"] - f["fat"] * 0.0 - 1.0
            hv = max((bot_v - top_v) / 2.0, 4.0)
            # fatty infiltration grows caudally (real paraspinals at L4-S1 are lower in density and
            # streaked with fat, more so with age): none above L2, paraspinal_fat's full amount from L5
            fat = s.paraspinal_fat * _ramp(z, self.center["L2"], self.center[self.lumbar[-1].name])
            for k, side in enumerate((-1.0, 1.0)):
                pu, pv = sx + side * (size + 6.0), (top_v + bot_v) / 2.0
                cv.ellipse(pu, pv, size, hv, m - 28.0 * fat)
                for i, (fu, fv, fl, ang, wid) in enumerate(self.streaks[k]):
                    if fat <= 0.05 or i >= 1 + int(fat * 5.99):
                        break
                    half = fl * min(size, hv)
                    du, dv = half * math.sin(ang), half * math.cos(ang)
                    cu, cvv = pu + side * fu * size, pv + fv * hv
                    ends = np.array([[cu - du, cvv - dv], [cu + du, cvv + dv]])
                    # keep the streak inside the muscle
                    ru = (ends[:, 0] - pu) / size
                    rv = (ends[:, 1] - pv) / hv
                    k_in = min(1.0, 0.85 / max(float(np.sqrt(ru * ru + rv * rv).max()), 1e-6))
                    ends = np.array([pu, pv]) + (ends - np.array([pu, pv])) * k_in
                    cv.polyline(ends, wid * (0.5 + 0.5 * fat), m + (_FAT - m) * (0.5 + 0.5 * fat))
        # psoas: from T12 down, growing caudally, joining iliacus in the pelvis
        c = self.center
        zs = np.array([v["T12"].bottom_z, c["L1"], c["L2"], c["L3"], c["L4"], c[self.lumbar[-1].name], c["S1"], s.femoral_head_z, s.femoral_head_z - 60])
        rs = np.array([0.0, 7.0, 11.0, 15.0, 19.0, 21.0, 20.0, 17.0, 14.0]) * ms
        r = _interp(z, zs, rs) if z <= zs[0] else 0.0
        if r > 1.0:
            w = self._width(z)
            t = _ramp(z, c["S1"], s.femoral_head_z)
            for side in (-1.0, 1.0):
                u = sx + side * ((w + r * 0.85) * (1 - t) + (self.fh_x - 18.0) * t)
                vv = (sy - 0.2 * self._depth(z)) * (1 - t) + (-0.1 * f["b"] - 28.0) * t
                cv.ellipse(u, vv, r * 0.95, r * 1.1, m)
        # quadratus lumborum
        q = _profile(z, c["T12"], c["L4"]) * 11.0 * ms
        if q > 1:
            for side in (-1.0, 1.0):
                cv.ellipse(sx + side * (self._width(z) + 45.0), sy + 22.0, q * 1.3, q, m, angle=side * 0.5)
        # gluteal muscles, from the iliac crest down
        g = _ramp(z, s.iliac_crest_z + 10, s.iliac_crest_z - 60)
        if g > 0:
            for side in (-1.0, 1.0):
                cv.ellipse(side * f["ac"] * 0.6, f["bc"] * 0.42, f["ac"] * 0.38 * g + 1, f["bc"] * 0.5 * g + 1, m)

    def _width(self, z: float) -> float:
        return float(np.interp(z, self.tops[::-1], [x.half_width for x in self.spec.vertebrae][::-1]))

    def _depth(self, z: float) -> float:
        return float(np.interp(z, self.tops[::-1], [x.half_depth for x in self.spec.vertebrae][::-1]))

    def _thorax(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        v, c = self.vert, self.center
        if z < self.lung_bottom:
            return
        ac, bc, sx, sy = f["ac"], f["bc"], f["sx"], f["sy"]
        apex = _ramp(z, v["T1"].top_z + 25, c["T3"])
        base = _ramp(z, self.lung_bottom, self.lung_bottom + 30)
        size = (0.45 + 0.55 * apex) * (0.55 + 0.45 * base)
        x_med, x_lat = 0.1 * ac + 12.0, ac - 3.0
        y_ant, y_post = -bc + 6.0, sy + 0.6 * self._depth(z)
        for side in (-1.0, 1.0):
            cu = side * (x_med + x_lat) / 2.0
            cv.ellipse(cu, (y_ant + y_post) / 2.0 + (1 - size) * 20, (x_lat - x_med) / 2.0 * size, (y_post - y_ant) / 2.0 * size, _LUNG)
        for (u, vv, amp, r, fr, ph) in self.vessels:
            uu = (u * 0.75 + amp * 0.1 * math.sin(fr * z + ph)) * ac
            if abs(uu) < x_med + 8:
                uu = math.copysign(x_med + 8 + abs(uu) * 0.3, uu)
            cv.ellipse(uu, vv * 0.6 * bc + 0.1 * bc, r, r, 40.0)
        # trachea and main bronchi
        if z > c["T4"]:
            cv.ellipse(sx, sy - self._depth(z) - 22.0, 10.0, 9.0, 40.0)
            cv.ellipse(sx, sy - self._depth(z) - 22.0, 8.0, 7.0, _AIR)
        elif z > c["T6"]:
            for side in (-1.0, 1.0):
                t = _ramp(z, c["T4"], c["T6"])
                cv.ellipse(sx + side * (5 + 25 * t), sy - self._depth(z) - 20.0, 6.0, 6.0, _AIR)
        # heart, ascending and descending aorta, sternum
        hf = _profile(z, *self.heart) ** 0.6
        if hf > 0:
            hu, hv = 0.12 * ac, -0.28 * bc
            cv.ellipse(hu, hv, 0.42 * ac * hf, 0.55 * bc * hf, self.hu("myocardium"), angle=-0.5)
            cv.ellipse(hu - 0.12 * ac * hf, hv - 0.05 * bc, 0.18 * ac * hf, 0.28 * bc * hf, self.hu("blood"), angle=-0.5)
            cv.ellipse(hu + 0.12 * ac * hf, hv + 0.08 * bc, 0.17 * ac * hf, 0.25 * bc * hf, self.hu("blood"), angle=-0.5)
        if c["T4"] > z > c["T6"]:
            cv.ellipse(-0.05 * ac, -0.42 * bc, 15.0, 15.0, self.hu("blood"))
        if v["T3"].top_z > z >= c["T4"]:
            pts = np.array([[-0.05 * ac, -0.42 * bc], [0.1 * ac, -0.3 * bc], [sx + 16.0, sy - self._depth(z) - 6.0]])
            cv.polyline(pts, 13.0, self.hu("blood"))
        if v["T2"].top_z > z > c["T10"]:
            cv.ellipse(0.0, -bc - 2.0, 16.0, 8.0, self.cortex)
            cv.ellipse(0.0, -bc - 2.0, 13.5, 5.5, self.spec.bone_hu + 80)

    def _abdomen(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        s, v, c = self.spec, self.vert, self.center
        ac, bc, sx, sy = f["ac"], f["bc"], f["sx"], f["sy"]
        d = self._depth(z)
        w = self._width(z)
        # liver, with its dome rising into the right lung base
        if self.dome_r > z > self.liver_bottom:
            grow = math.sqrt(_ramp(z, self.dome_r, self.dome_r - 40))
            shrink = _ramp(z, self.liver_bottom, v["T12"].bottom_z)
            k = grow * (0.3 + 0.7 * shrink)
            lat = 1 - shrink
            cv.ellipse(-(0.42 + 0.2 * lat) * ac, -0.08 * bc + 0.1 * lat * bc, 0.52 * ac * k, 0.74 * bc * k, self.hu("liver"))
            if z > v["T12"].bottom_z:
                cv.ellipse(0.08 * ac, -0.5 * bc, 0.38 * ac * grow, 0.28 * bc * grow, self.hu("liver"), angle=0.15)
            if self.gallbladder:
                g = _profile(z, v["L1"].top_z, c["L2"])
                cv.ellipse(-0.3 * ac, -0.55 * bc, 16 * g, 13 * g, 10.0)
        # stomach (air anteriorly) and spleen under the left dome
        st = _profile(z, self.dome_l, v["L1"].bottom_z)
        if st > 0:
            su, sv = 0.3 * ac, -0.38 * bc
            cv.ellipse(su, sv, 0.26 * ac * st, 0.3 * bc * st, self.hu("bowel_wall"), angle=0.5)
            cv.ellipse(su, sv, 0.26 * ac * st - 3, 0.3 * bc * st - 3, 250.0 if s.oral_contrast else 15.0, angle=0.5)
            cv.ellipse(su, sv, 0.26 * ac * st - 3, 0.3 * bc * st - 3, _AIR, angle=0.5, above=sv - 0.1 * bc * st)
        sp = _profile(z, self.dome_l - 5, c["L1"])
        if sp > 0:
            cv.ellipse(0.6 * ac, 0.25 * bc, 0.2 * ac * sp, 0.38 * bc * sp, self.hu("spleen"), angle=-0.5)
        # pancreas across the spine at L1-L2
        pz = _profile(z, v["L1"].top_z, c["L2"])
        if pz > 0.2:
            pts = np.array([[sx - 0.25 * ac, sy - d - 38], [sx, sy - d - 30], [0.45 * ac, sy - d - 5]])
            cv.polyline(pts, 9.0 * pz, self.hu("pancreas"))
        # kidneys
        for side, (top, bottom) in ((1.0, self.kidney_l), (-1.0, self.kidney_r)):
            k = _profile(z, top, bottom)
            if k <= 0:
                continue
            ku, kv = sx + side * (w + 48.0), sy + 0.1 * d
            ang = side * 0.6
            cv.ellipse(ku, kv, 31 * k, 21 * k, self.hu("kidney_cortex"), angle=ang)
            cv.ellipse(ku, kv, 31 * k - 7, 21 * k - 7, self.hu("kidney_medulla"), angle=ang)
            if k > 0.5:
                hu_sinus = 550.0 if s.contrast == "delayed" else -60.0
                cv.ellipse(ku - side * 14 * k, kv - 7 * k, 9 * k, 6 * k, hu_sinus, angle=ang)
        # aorta, iliac arteries, IVC
        blood, vein = self.hu("blood"), self.hu("vein")
        lum = self.lumbar
        if c["T4"] > z > c["L4"]:
            t = _ramp(z, c["T10"], c["L1"])
            cv.ellipse(sx + (0.6 * w + 8) * (1 - t) + 10 * t, sy - d - 12 + (-4 * t), 12 - 2 * t, 12 - 2 * t, blood)
        elif c["L4"] >= z > s.femoral_head_z:
            t = _ramp(z, c["L4"], s.femoral_head_z)
            for side in (-1.0, 1.0):
                cv.ellipse(sx + side * (10 + t * (self.fh_x - 20)), sy - d - 10 - 25 * t, 7.0, 7.0, blood)
                cv.ellipse(sx + side * (6 + t * (self.fh_x - 28)), sy - d - 2 - 22 * t, 8.0, 7.0, vein)
        if c["T11"] > z > c[lum[-1].name]:
            cv.ellipse(sx - 22.0, sy - d - 12.0, 13.0, 9.0, vein)
        # bowel loops and colon
        wall = self.hu("bowel_wall")
        for k, tube in enumerate(self.tubes):
            if not tube.bottom < z < tube.top:
                continue
            r = tube.radius * (0.5 + 0.5 * _profile(z, tube.top + 10, tube.bottom - 10))
            u = (tube.u + tube.amp_u * math.sin(tube.freq * z + tube.phase)) * ac
            vv = (tube.v + tube.amp_v * math.cos(tube.freq * z + tube.phase)) * bc
            vv = min(vv, sy - d - r - 4.0)
            cv.ellipse(u, vv, r, r, wall)
            inner = r - 2.5
            if tube.content == "contrast":
                cv.ellipse(u, vv, inner, inner, 260.0)
            elif tube.content == "fluid":
                cv.ellipse(u, vv, inner, inner, 18.0)
            elif tube.content == "stool":
                # faeces: soft tissue mottled with many small gas bubbles
                cv.ellipse(u, vv, inner, inner, -30.0)
                for ang, rr, br in self.bubbles[k]:
                    ang = ang + 0.05 * z
                    cv.ellipse(u + rr * inner * math.cos(ang), vv + rr * inner * math.sin(ang), br, br, _AIR)
                cv.ellipse(u, vv, inner, inner, _AIR, above=vv - 0.4 * inner)
            elif tube.content == "collapsed":
                cv.ellipse(u, vv, r, r, wall + 5.0)
            else:
                cv.ellipse(u, vv, inner, inner, 18.0)
                cv.ellipse(u, vv, inner, inner, _AIR, above=vv + 0.3 * inner)
        # transverse colon, hanging anteriorly from L2 down to L5 (colon_drop), with mottled stool, gas
        # or fluid: its height is no landmark of a level
        lum5 = self.lumbar[min(4, len(self.lumbar) - 1)]
        drop = s.colon_drop * (v["L2"].bottom_z - lum5.bottom_z)
        tc = _profile(z, v["L1"].bottom_z - drop, v["L2"].bottom_z - drop)
        if tc > 0.3:
            pts = np.array([[-0.6 * ac, -0.35 * bc], [-0.2 * ac, -0.72 * bc], [0.3 * ac, -0.7 * bc], [0.62 * ac, -0.3 * bc]])
            cv.polyline(pts, 16.0 * tc, wall)
            inner = 13.0 * tc
            cv.polyline(pts, inner, {"stool": -20.0, "air": _AIR, "fluid": 15.0}[s.colon_content])
            if s.colon_content == "stool":
                seg = np.linspace(0.0, 1.0, 14)
                for k, tk in enumerate(seg):
                    i = min(int(tk * 3), 2)
                    f_ = tk * 3 - i
                    pu, pv = pts[i] * (1 - f_) + pts[i + 1] * f_
                    ang = 2.4 * k + 0.07 * z
                    cv.ellipse(pu + 0.5 * inner * math.cos(ang), pv + 0.5 * inner * math.sin(ang), 2.5, 2.5, _AIR)
        del s

    def _pelvis_soft(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        s, v = self.spec, self.vert
        ac, bc, sx, sy = f["ac"], f["bc"], f["sx"], f["sy"]
        bl = _profile(z, *self.bladder)
        if bl > 0:
            bu, bv = 0.0, -0.4 * bc
            cv.ellipse(bu, bv, 48 * bl, 38 * bl, 35.0)
            cv.ellipse(bu, bv, 48 * bl - 3, 38 * bl - 3, 10.0)
            if s.contrast == "delayed":
                cv.ellipse(bu, bv, 48 * bl - 3, 38 * bl - 3, 650.0, below=bv + 10 * bl)
        if v["S3"].top_z > z > s.femoral_head_z - 60:
            rv = sy - self._depth(z) - 22.0
            cv.ellipse(sx, rv, 17.0, 15.0, self.hu("bowel_wall"))
            cv.ellipse(sx, rv, 14.0, 12.0, -20.0)
            cv.ellipse(sx, rv, 14.0, 12.0, _AIR, above=rv - 6.0)
        del ac

    # --- bones -------------------------------------------------------------------------------------

    def _bone(self, cv: Canvas, u: float, v: float, a: float, b: float, shell: float = 1.6, angle: float = 0.0, marrow: float | None = None) -> None:
        cv.ellipse(u, v, a, b, self.cortex, angle=angle)
        cv.ellipse(u, v, a - shell, b - shell, self.spec.bone_hu if marrow is None else marrow, angle=angle)

    def _spine(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        s = self.spec
        vs = s.vertebrae
        sx, sy = f["sx"], f["sy"]
        inside = np.nonzero((self.bottoms <= z) & (z <= self.tops))[0]
        above = np.nonzero(self.bottoms > z)[0]
        if len(inside):
            vert = vs[int(inside[0])]
            self._body(cv, vert, z, sx, sy)
        elif len(above) and above[-1] + 1 < len(vs):
            up, down = vs[int(above[-1])], vs[int(above[-1]) + 1]
            w = (up.half_width + down.half_width) / 2
            d = (up.half_depth + down.half_depth) / 2
            fused = s.variant == "sacralised_L5" and up.name == "L5"
            cv.ellipse(sx, sy, w, d, 450.0 if fused else 95.0)
            if not fused:
                cv.ellipse(sx, sy, w * 0.6, d * 0.55, 70.0)
        # canal and posterior elements of the vertebrae near z
        rel = (self.tops - z) / np.maximum(self.tops - self.bottoms, 1.0)
        near = np.nonzero((rel > -0.45) & (rel < 2.0))[0]
        if len(near) == 0:
            return
        ref = vs[int(near[0])] if not len(inside) else vs[int(inside[0])]
        cr_x, cr_y = self._canal(ref)
        d_ref = self._depth(z)
        canal_v = sy + d_ref + cr_y + 1.0
        if ref.kind != "coccyx" and z > vs[-1].top_z:
            cv.ellipse(sx, canal_v, cr_x + 1.0, cr_y + 1.0, _CSF)
            if z > self.vert["L1"].bottom_z:
                cv.ellipse(sx, canal_v, cr_x * 0.55, cr_y * 0.6, _CORD)
        for i in near:
            vert = vs[int(i)]
            self._posterior(cv, vert, float(rel[i]), sx, sy, d_ref)

    def _canal(self, vert: Vertebra) -> tuple[float, float]:
        if vert.kind == "thoracic":
            return 8.0, 7.0
        if vert.kind == "lumbar":
            return 11.0, 8.0
        if vert.kind == "sacral":
            return 10.0 - 1.4 * vert.number, 5.0 - 0.6 * vert.number
        return 0.0, 0.0

    def _body(self, cv: Canvas, vert: Vertebra, z: float, sx: float, sy: float) -> None:
        s = self.spec
        t = (vert.top_z - z) / vert.height
        w, d = vert.half_width, vert.half_depth
        if vert.kind == "sacral":
            ala = {1: 32.0, 2: 24.0, 3: 15.0}.get(vert.number, 0.0)
            if ala:
                for side in (-1.0, 1.0):
                    self._bone(cv, sx + side * (w + ala / 2 - 4), sy + 0.25 * d, ala / 2 + 4, d * 1.15, shell=1.5)
                    cv.ellipse(sx + side * (w + 2), sy + 0.1 * d, 3.5, 3.5, -40.0)
            self._bone(cv, sx, sy, w, d, shell=1.5)
            return
        endplate = t < 0.04 or t > 0.96
        self._bone(cv, sx, sy, w, d, shell=1.4, marrow=420.0 if endplate else None)
        if vert.kind == "lumbar":
            # the posterior wall of a lumbar body is concave
            cv.ellipse(sx, sy + d + 5.0, w * 0.45, 7.0, _CSF)
        del s

    def _posterior(self, cv: Canvas, vert: Vertebra, t: float, sx: float, sy: float, d: float) -> None:
        kind = vert.kind
        if kind == "coccyx":
            return
        cr_x, cr_y = self._canal(vert)
        cv_ = sy + d + cr_y + 1.0  # canal centre
        bone = self.spec.bone_hu + 120.0
        if kind == "sacral":
            if -0.1 < t < 1.1:
                back = cv_ + cr_y + 3.0
                pts = np.array([[sx - cr_x - 6, cv_], [sx - cr_x * 0.6, back], [sx + cr_x * 0.6, back], [sx + cr_x + 6, cv_]])
                cv.polyline(pts, 3.0, self.cortex)
                if vert.number <= 3:
                    cv.ellipse(sx, back + 4.0, 3.0, 5.0, self.cortex)
            return
        lumbar = kind == "lumbar"
        # pedicles
        if 0.05 < t < 0.6:
            for side in (-1.0, 1.0):
                pu = sx + side * (cr_x + 4.0)
                self._bone(cv, pu, cv_ - 1.0, 4.5, cr_y + 2.0, shell=1.5, marrow=bone)
        # transverse processes (the lumbar ones longest at L3) and, in the sacralised L5, their fusion
        if 0.2 < t < 0.65 or (self.spec.variant == "sacralised_L5" and vert.name == "L5" and 0.2 < t < 1.3):
            if lumbar:
                length = {1: 14.0, 2: 21.0, 3: 31.0, 4: 24.0, 5: 19.0, 6: 17.0}[vert.number]
                rad = 4.5
                if self.spec.variant == "sacralised_L5" and vert.name == "L5":
                    length, rad = 42.0, 9.0
                for side in (-1.0, 1.0):
                    pts = np.array([[sx + side * (cr_x + 4), cv_], [sx + side * (cr_x + 4 + length), cv_ - 4.0]])
                    cv.polyline(pts, rad, self.cortex)
                    cv.polyline(pts, rad - 1.6, bone)
            else:
                reach, back = _thoracic_transverse(vert.number)
                for side in (-1.0, 1.0):
                    pts = np.array([[sx + side * (cr_x + 4), cv_], [sx + side * (cr_x + 4 + reach), cv_ + back]])
                    cv.polyline(pts, 4.5, self.cortex)
                    cv.polyline(pts, 2.8, bone)
        # facets: superior articular processes at the top, inferior ones at the bottom
        if -0.35 < t < 0.15 or 0.85 < t < 1.3:
            inferior = t > 0.5
            for side in (-1.0, 1.0):
                fu = sx + side * (cr_x + (3.0 if inferior else 7.0))
                self._bone(cv, fu, cv_ + cr_y + (6.0 if inferior else 2.0), 4.5, 6.0, shell=1.5, marrow=bone)
        # laminae
        if 0.35 < t < 1.15:
            back = cv_ + cr_y + 4.0
            pts = np.array([[sx - cr_x - 4, cv_ + 2], [sx - 3, back], [sx + 3, back], [sx + cr_x + 4, cv_ + 2]])
            cv.polyline(pts, 3.2, self.cortex)
        # spinous process: lumbar (and the transitional T11-T12) straight back, thoracic long and
        # sloping down (seen lower)
        if (lumbar or vert.number >= 11) and 0.45 < t < 1.2:
            base = cv_ + cr_y + 4.0
            tip = min(base + (26.0 + 2 * vert.number if lumbar else 24.0), self._back_muscle - 6.0)
            pts = np.array([[sx, base], [sx, max(tip, base + 8.0)]])
            cv.polyline(pts, 4.5, self.cortex)
            cv.polyline(pts, 2.8, bone)
        elif not lumbar and 0.55 < t < 1.9:
            base = cv_ + cr_y + 4.0
            k = (t - 0.55) / 1.35
            reach = max(self._back_muscle - 6.0 - base, 12.0)
            pts = np.array([[sx, base + (reach - 8.0) * k], [sx, base + 8.0 + (reach - 8.0) * k]])
            cv.polyline(pts, 4.0, self.cortex)

    def _ribs(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        half = _RIB_BAND / 2.0
        for pts, zz, cart in self.ribs:
            if z > zz[0] + half or z < zz[-1] - half:
                continue
            sel = np.nonzero(np.abs(zz - z) <= half)[0]
            if len(sel) == 0:
                continue
            n = len(zz) - 2
            i0, i1 = int(sel[0]), int(sel[-1])
            if i1 - i0 > 12:
                idx = np.unique(np.linspace(i0, i1, 12).astype(int))
            else:
                idx = np.arange(i0, i1 + 1)
            seg = pts[idx]
            pos = (idx - 2) / max(n, 1)
            if np.all(pos > cart):
                cv.polyline(seg, 3.5, 130.0)
            else:
                cv.polyline(seg, 3.5, self.cortex - 100.0)
                if len(seg) > 1:
                    cv.polyline(seg, 1.6, self.spec.bone_hu + 60)

    def _pelvis_bone(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        s, v = self.spec, self.vert
        bc = f["bc"]
        fh = s.femoral_head_z
        R = self.fh_r
        fv = -0.08 * f["b"] + 10.0
        crest, roof = s.iliac_crest_z, self.acetabulum_roof
        if crest >= z > roof - 10:
            self._ilium(cv, z, f)
        # femoral heads in the acetabula, necks and trochanters below
        for side in (-1.0, 1.0):
            hu = side * self.fh_x
            dz = z - fh
            if abs(dz) < R + 9:
                rc = math.sqrt(max((R + 6) ** 2 - dz * dz, 0.0))
                angs = np.linspace(0.6, 2 * math.pi - 0.6, 14)
                ring = np.stack([hu - side * rc * np.cos(angs), fv + rc * np.sin(angs)], axis=1)
                if dz > R:
                    self._bone(cv, hu, fv, R + 6, R, shell=2.5)
                elif rc > 4:
                    cv.polyline(ring, 5.0, self.cortex - 100)
            if abs(dz) < R:
                rh = math.sqrt(R * R - dz * dz)
                cv.ellipse(hu, fv, rh + 1.5, rh + 1.5, 60.0)
                self._bone(cv, hu, fv, rh, rh, shell=2.0, marrow=s.bone_hu + 60)
            if fh > z > fh - 40:
                pts = np.array([[hu, fv], [hu + side * 45.0, fv + 8.0]])
                cv.polyline(pts, 13.0, self.cortex)
                cv.polyline(pts, 10.0, s.bone_hu)
            if fh + 5 > z > fh - 55:
                self._bone(cv, hu + side * 52.0, fv + 10.0, 18.0, 20.0, shell=2.0)
            if z <= fh - 45:
                self._bone(cv, hu + side * 42.0, fv + 5.0, 14.0, 14.0, shell=5.0, marrow=-40.0)
            if fh - 5 > z > fh - 30:
                pts = np.array([[hu - side * 15.0, fv - 22.0], [side * 14.0, -0.78 * bc]])
                cv.polyline(pts, 7.0, self.cortex)
                cv.polyline(pts, 4.5, s.bone_hu)
            if fh - 20 > z > fh - 50:
                self._bone(cv, side * 9.0, -0.78 * bc, 8.0, 14.0, shell=2.0)
            if fh - 8 > z > fh - 65:
                self._bone(cv, hu - side * 22.0, fv + 42.0, 11.0, 16.0, shell=2.5)
        del v

    def _ilium(self, cv: Canvas, z: float, f: dict[str, float]) -> None:
        """Iliac wings: oblique plates from the sacroiliac joint (or, above the sacrum, beside the L5
        transverse processes) to the anterior superior iliac spine, thick posteriorly, a thin blade in
        the middle; the crest is a curved rim, so its first cuts are short bars in the middle of the
        wing that lengthen caudally; towards the acetabulum the wing turns into the thick body of the ilium.
        """
        s = self.spec
        ac, bc, sx, sy = f["ac"], f["bc"], f["sx"], f["sy"]
        fv = -0.08 * f["b"] + 10.0
        crest, roof = s.iliac_crest_z, self.acetabulum_roof
        u = _ramp(z, crest, roof)
        grow = _ramp(z, crest, crest - 28.0)  # 0 at the top of the crest, 1 where the whole wing is cut
        sac = self._sacral_half_width(z)
        r_blade = s.ilium_mm
        r_post = 2.6 * r_blade
        lo, hi = 0.55 - 0.55 * grow**0.7, 0.7 + 0.3 * grow**0.7
        tt = np.linspace(lo, hi, 12)[:, None]
        tm = (tt[:-1, 0] + tt[1:, 0]) / 2
        rad = r_blade + (r_post - r_blade) * np.clip(1.0 - tm / 0.3, 0.0, 1.0) + 0.5 * r_blade * np.clip((tm - 0.85) / 0.15, 0.0, 1.0)
        rad = rad * (1.0 + 0.4 * (1.0 - _ramp(z, crest, crest - 6.0)))  # the crest is a thickened rim
        rad = rad + 12.0 * max(0.0, u - 0.6) / 0.4 + 2.0 * u
        r0 = r_post * 1.4 + 2.0 * u + 12.0 * max(0.0, u - 0.6) / 0.4  # the posterior end at its thickest
        # the bone itself (second realism round): a thin blade of two cortical tables with fatty marrow
        # between them (real blades are thin bright lines with dark marrow, not bright bands), thick only
        # posteriorly near the sacroiliac joint and towards the acetabulum
        thin = max(s.ilium_blade_mm, 0.55 * s.pixel_spacing)
        rb = thin + (r_post - thin) * np.clip(1.0 - tm / 0.3, 0.0, 1.0) ** 1.5 + 0.5 * thin * np.clip((tm - 0.85) / 0.15, 0.0, 1.0)
        rb = rb * (1.0 + 0.4 * (1.0 - _ramp(z, crest, crest - 6.0)))
        rb = rb + 12.0 * max(0.0, u - 0.6) / 0.4 + 2.0 * u
        marrow = s.ilium_marrow_hu * (1.0 - u) + (s.bone_hu + 40.0) * u
        shell = max(s.ilium_cortex_mm, 0.75 * s.pixel_spacing)  # a ring thinner than a pixel would have gaps
        for side in (-1.0, 1.0):
            if sac > 0:  # beside the sacral ala, across a 2 mm sacroiliac joint space
                p0 = (sx + side * (sac + 2.0 + r0), sy + 10.0)
            else:
                p0 = (sx + side * (self._width(z) + 34.0), sy + 28.0)
                if z < self.vert["S1"].top_z:  # below the sacroiliac joints: to the greater sciatic notch
                    p0 = (p0[0] * (1 - u) + side * (self.fh_x - 22) * u, p0[1] * (1 - u) + (fv + 28) * u)
            p2 = (side * (0.82 * ac * (1 - u) + (self.fh_x + 4) * u), -0.28 * bc * (1 - u) + (fv - 14) * u)
            mid = ((p0[0] + p2[0]) / 2, (p0[1] + p2[1]) / 2)
            span = math.hypot(p2[0] - p0[0], p2[1] - p0[1])
            ctrl = (mid[0] + side * 0.16 * span, mid[1] + 0.10 * span)
            pts = (1 - tt) ** 2 * np.array(p0) + 2 * (1 - tt) * tt * np.array(ctrl) + tt**2 * np.array(p2)
            cv.polyline(pts + np.array([-side * 9.0, -4.0]), rad + 6.0 * (1 - u) + 2.0, self.hu("muscle"))  # iliacus
            cv.polyline(pts, rb, self.cortex - 50.0)
            cv.polyline(pts, np.maximum(rb - shell, 0.05), marrow)

    def _sacral_half_width(self, z: float) -> float:
        for vert in self.spec.vertebrae:
            if vert.kind == "sacral" and vert.bottom_z <= z <= vert.top_z:
                ala = {1: 32.0, 2: 24.0, 3: 15.0}.get(vert.number, 0.0)
                return vert.half_width + ala - 4 + 4
        return 0.0


def _thoracic_transverse(number: int) -> tuple[float, float]:
    """Length (mm, lateral) and posterior reach (mm) of the transverse process of thoracic vertebra
    ``number``. T1-T10 carry long processes pointing back and out to their rib's tubercle; T11's is
    short and has no rib facet, and T12's is only a small tubercle (its ribs articulate with the
    bodies alone): T11-T12 are transitional, lumbar-like vertebrae, which real CT of the lower
    chest shows (the phantom's long T12 processes made real T11-T12 read as L1)."""
    return {11: (12.0, 5.0), 12: (6.0, 1.5)}.get(number, (22.0, 12.0))


def render_slice(spec: StudySpec, z: float, anatomy: Anatomy | None = None) -> np.ndarray:
    """Clean HU image of the slice of ``spec`` centred at ``z`` (no noise), float32 (size, size)."""
    return (anatomy or Anatomy(spec)).render(z)


def noise_bank(rng: np.random.Generator, size: int, count: int = 4) -> np.ndarray:
    """``count`` fields of unit-variance, slightly correlated noise (size + 32 square) to crop from."""
    n = size + 32
    fields = rng.standard_normal((count, n, n), dtype=np.float32)
    for k in range(count):
        fields[k] = gaussian_filter(fields[k], 0.7)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields


def add_noise(img: np.ndarray, bank: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Blur edges a little (the reconstruction kernel), then add a random crop of the noise bank."""
    out = gaussian_filter(img, 0.6)
    if sigma > 0:
        n = img.shape[0]
        k = int(rng.integers(0, bank.shape[0]))
        i, j = (int(x) for x in rng.integers(0, bank.shape[1] - n + 1, size=2))
        out += bank[k, i:i + n, j:j + n] * np.float32(sigma)
    return out
