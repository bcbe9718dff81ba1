"""The review page in a real browser: headless Chromium (Debian's package) driven by Playwright.

Skipped, with the reason, only where Chromium is not installed (``apt-get install chromium``; CI
installs it). Screenshots and timings go to ``tests/browser/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from browser.reportcase import ARTIFACTS, chromium_path, launch_chromium, phantom_case

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium); the browser tests need it")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # a dev dependency: a missing one is an error, not a skip
        pytest.fail("playwright is not installed: pip install playwright (its own browser download is not needed)")
    with sync_playwright() as p:
        context = launch_chromium(p, CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield context
        finally:
            context.close()


class _Page:
    """A page with every console error, page error and failed request recorded."""

    def __init__(self, context, url: str) -> None:  # noqa: ANN001
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"))
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def visible_rows(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "#series-body tr[data-uid]", "trs => trs.map(t => ({uid: t.dataset.uid, status: t.dataset.status, flags: t.dataset.flags.split(' ').filter(Boolean)}))"
        )

    def load_all_images(self) -> list[dict]:
        """Scroll every image into view (they are lazy) and wait until each has loaded or failed."""
        self.page.eval_on_selector_all("#series-body img, #metrics img", "imgs => imgs.forEach(i => { i.loading = 'eager'; })")
        for handle in self.page.query_selector_all("#series-body img, #metrics img"):
            handle.scroll_into_view_if_needed()
        self.page.wait_for_function(
            "() => Array.from(document.querySelectorAll('#series-body img, #metrics img')).every(i => i.complete)", timeout=30_000
        )
        return self.page.eval_on_selector_all(
            "#series-body img, #metrics img", "imgs => imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight}))"
        )


def _page_data(report: Path) -> dict:
    import re

    html = (report / "index.html").read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1))


def test_report_page_in_chromium(browser, tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> None:  # noqa: ANN001
    case = _case(tmp_path_factory, model_path)
    data = _page_data(case.report)
    page = _Page(browser, (case.report / "index.html").as_uri())

    # every series is listed (one page holds them all), nothing broke, nothing left the file system
    rows = page.visible_rows()
    assert sorted(r["uid"] for r in rows) == sorted(r["series_uid"] for r in data["series"])
    if data["metrics"]:
        page.page.click("#metrics-title")  # the evaluation is folded away by default
    images = page.load_all_images()
    assert images, "the page shows no image"
    broken = [i["src"] for i in images if i["w"] == 0 or i["h"] == 0]
    assert not broken, f"images that did not load: {broken}"
    n_thumbs = sum(len(r.get("thumbs", {})) for r in data["series"])
    assert len(images) == n_thumbs + (1 if data["confusion_png"] else 0)
    assert all(u.startswith(("file://", "data:")) for u in page.requests), [u for u in page.requests if not u.startswith(("file://", "data:"))]

    # the vanished series says so
    gone = page.page.inner_text(f"tr[data-uid='{case.removed_series}']")
    assert "images unavailable" in gone

    # filter by each flag: exactly the series with that flag
    flags = sorted({f for r in data["series"] for f in r["flags"]})
    assert flags, "the phantom run should raise at least one flag"
    for flag in flags:
        page.page.select_option("#f-flag", flag)
        shown = page.visible_rows()
        expected = sorted(r["series_uid"] for r in data["series"] if flag in r["flags"])
        assert sorted(r["uid"] for r in shown) == expected, flag
        assert all(flag in r["flags"] for r in shown)
        assert f"flag={flag}" in page.page.evaluate("location.hash")
    page.page.select_option("#f-flag", "")

    # filter by status; combine with 'no flag'
    page.page.select_option("#f-status", "skipped")
    assert {r["status"] for r in page.visible_rows()} == {"skipped"}
    assert len(page.visible_rows()) == sum(r["status"] == "skipped" for r in data["series"])
    page.page.select_option("#f-status", "ok")
    page.page.select_option("#f-images", "unavailable")
    assert [r["uid"] for r in page.visible_rows()] == [case.removed_series]
    page.page.select_option("#f-images", "")
    page.page.select_option("#f-status", "")

    # sorting by slices, descending on the second click
    page.page.click("th[data-key='n_slices']")
    page.page.click("th[data-key='n_slices']")
    uids = [r["uid"] for r in page.visible_rows()]
    by_uid = {r["series_uid"]: r for r in data["series"]}
    counts = [by_uid[u]["n_slices"] for u in uids]
    assert counts == sorted(counts, reverse=True)

    # the view is in the URL: reopening with a hash restores the filter
    flag = flags[0]
    page2 = _Page(browser, (case.report / "index.html").as_uri() + f"#flag={flag}")
    assert sorted(r["uid"] for r in page2.visible_rows()) == sorted(r["series_uid"] for r in data["series"] if flag in r["flags"])

    # the skipped files are listed
    page.page.click("#skipped-title")
    assert page.page.locator("#skipped-body tr").count() == len(data["skipped"])

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.page.evaluate("window.scrollTo(0, 0)")
    page.page.screenshot(path=str(ARTIFACTS / "report_page.png"), full_page=True)
    assert (ARTIFACTS / "report_page.png").stat().st_size > 10_000
    assert not page.errors + page2.errors, page.errors + page2.errors


def _case(tmp_path_factory: pytest.TempPathFactory, model_path: Path):  # noqa: ANN202
    base = tmp_path_factory.getbasetemp() / "report-case"
    base.mkdir(exist_ok=True)
    return phantom_case(base, model_path)


def _synthetic_rows(n: int) -> list[dict]:
    import random

    rnd = random.Random(0)
    flags = ["l3_not_in_fov", "low_confidence", "short_l3", "long_l3", "order_conflict", "possible_transitional", "skipped_level", "dropped_slices"]
    rows = []
    for i in range(n):
        status = "ok" if i % 10 else rnd.choice(["skipped", "error"])
        f = sorted(rnd.sample(flags, rnd.choice([0, 0, 0, 1, 1, 2]))) if status == "ok" else []
        l3 = None if "l3_not_in_fov" in f or status != "ok" else rnd.randint(20, 300)
        rows.append({
            "series_uid": f"1.2.826.0.1.3680043.8.498.{i:08d}", "study_uid": f"1.2.826.0.1.3680043.8.498.{i // 3:08d}",
            "status": status, "reason": None if status == "ok" else "localizer (scout) images", "n_slices": rnd.randint(10, 1200),
            "slice_thickness_mm": rnd.choice([0.625, 1.25, 2.5, 5.0]), "l3_index": l3, "l3_z_mm": None if l3 is None else -300.0 - l3,
            "l3_first_index": None if l3 is None else l3 - 5, "l3_last_index": None if l3 is None else l3 + 5,
            "levels_present": ["T", "L1", "L2", "L3", "L4", "L5", "S"] if status == "ok" else [], "flags": f, "n_evaluated": 40,
            "n_disagree": rnd.randint(0, 9) if status == "ok" else None, "images": "not rendered" if status == "ok" else "none",
        })
    return rows


def test_page_with_10000_series(browser, tmp_path: Path) -> None:  # noqa: ANN001
    """Render, filter and sort 10,000 rows (synthetic, no images); timings are recorded, not asserted tightly."""
    from spinelevel.report.page import PAGE_FORMAT, write_page
    from spinelevel.report.render import hex_colour, level_colours

    classes = ["T", "L1", "L2", "L3", "L4", "L5", "S"]
    rows = _synthetic_rows(10_000)
    data = {"format": PAGE_FORMAT, "generated": "now", "run": {"run_id": "scale"}, "classes": classes,
            "colours": {c: hex_colour(v) for c, v in level_colours(classes).items()}, "series": rows,
            "skipped": [[f"/archive/file{i}", "not a DICOM file"] for i in range(20_000)], "metrics": None, "confusion_png": None}
    index = write_page(tmp_path / "index.html", data)
    started = time.perf_counter()
    page = _Page(browser, index.as_uri())
    load_s = time.perf_counter() - started
    assert page.page.locator("#series-body tr[data-uid]").count() == 50
    assert page.page.get_attribute("body", "data-rows") == "10000"

    timings = {"html_bytes": index.stat().st_size, "load_and_first_render_s": round(load_s, 3)}
    expected = sum("order_conflict" in r["flags"] for r in rows)
    t0 = time.perf_counter()
    page.page.select_option("#f-flag", "order_conflict")
    page.page.wait_for_function(f"document.body.dataset.rows === '{expected}'")
    timings["filter_s"] = round(time.perf_counter() - t0, 3)
    timings["filter_render_ms_in_page"] = float(page.page.get_attribute("body", "data-render-ms"))
    assert all("order_conflict" in r["flags"] for r in page.visible_rows())
    t0 = time.perf_counter()
    page.page.select_option("#f-flag", "")
    page.page.click("th[data-key='l3_z_mm']")
    timings["sort_s"] = round(time.perf_counter() - t0, 3)
    timings["sort_render_ms_in_page"] = float(page.page.get_attribute("body", "data-render-ms"))
    page.page.select_option("#f-size", "500")
    assert page.page.locator("#series-body tr[data-uid]").count() == 500
    page.page.fill("#f-q", "00009999")
    page.page.wait_for_function("document.body.dataset.rows === '1'")
    assert not page.errors, page.errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report_scale_10000.json").write_text(json.dumps(timings, indent=2) + "\n")
    print("10,000-series page:", timings)
    # generous bounds: a usable page, not a benchmark
    assert load_s < 30 and timings["filter_s"] < 10 and timings["sort_s"] < 10
