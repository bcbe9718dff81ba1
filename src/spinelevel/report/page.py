"""REPORT/index.html: one static page that lists every series of a run, for a reviewer.

The page is a single file: inline CSS, vanilla JavaScript and the data as embedded JSON. Nothing is
loaded from a server or the internet; it opens from the file system (``file://``). Rows are rendered
one page at a time (25-500 rows) from the JSON, with lazily loaded thumbnails, so a run of 10,000
series filters and sorts in milliseconds. The filter, sort and page live in the URL's ``#`` part
(``index.html#flag=order_conflict&sort=l3_z``), so a view can be bookmarked or shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PAGE_FORMAT", "render_page", "write_page"]

# Version of the embedded JSON (the page's contract with whoever reads it).
PAGE_FORMAT = "spinelevel.report/1"


def _json_for_script(data: Any) -> str:
    """JSON that is safe inside a <script> element (no '<', so no '</script>' or '<!--')."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_page(data: dict[str, Any]) -> str:
    """The HTML text of index.html for the report data (see :func:`spinelevel.report.build.build_report`)."""
    return _TEMPLATE.replace("/*DATA*/", _json_for_script(data))


def write_page(path: Path, data: dict[str, Any]) -> Path:
    """Write index.html atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_page(data), encoding="utf-8")
    tmp.replace(path)
    return path


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>spinelevel review report</title>
<style>
:root { --bg:#fff; --fg:#1d1d1f; --mute:#666; --line:#ddd; --head:#f4f4f6; --warn:#b35900; --err:#b00020; --ok:#1b7f3b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { padding: 12px 20px; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 18px 0 8px; }
.mute { color: var(--mute); }
main { padding: 0 20px 40px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; background: var(--head); }
.card b { font-size: 16px; display: block; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
.chip { border: 1px solid #c9c9d1; border-radius: 12px; padding: 2px 10px; background: #fff; cursor: pointer; font: inherit; }
.chip.on { background: #1d1d1f; color: #fff; border-color: #1d1d1f; }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; padding: 8px 0; position: sticky; top: 0; background: var(--bg); z-index: 2; border-bottom: 1px solid var(--line); }
.controls label { display: flex; gap: 4px; align-items: center; }
select, input[type=search], button { font: inherit; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: var(--head); position: sticky; top: 44px; z-index: 1; white-space: nowrap; }
th.sort { cursor: pointer; user-select: none; }
th.sort:hover { text-decoration: underline; }
th .arrow { color: var(--mute); font-size: 11px; }
td.img { padding: 2px; text-align: center; min-width: 40px; }
td.img.has { background: #000; }
td.img img { display: block; margin: 0 auto; }
td.img .na { color: var(--mute); font-size: 12px; padding: 6px; display: block; max-width: 160px; }
td.img.has .na { color: #ccc; }
td.uid { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11px; word-break: break-all; min-width: 180px; max-width: 250px; }
.flag { display: inline-block; background: #fff3e0; color: #7a3d00; border: 1px solid #f0c48a; border-radius: 4px; padding: 0 5px; margin: 1px 2px 1px 0; font-size: 12px; white-space: nowrap; }
.st-ok { color: var(--ok); } .st-skipped { color: var(--mute); } .st-error { color: var(--err); font-weight: 600; }
.lv { display: inline-block; min-width: 22px; text-align: center; border-radius: 3px; padding: 0 3px; margin: 1px; font-size: 12px; color: #000; }
.pager { display: flex; gap: 6px; align-items: center; margin: 8px 0; }
.legend { display: flex; gap: 10px; flex-wrap: wrap; align-items: center; font-size: 13px; }
.sw { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 3px; }
#metrics .row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
#metrics table { width: auto; } #metrics td, #metrics th { padding: 2px 8px; position: static; }
#metrics img { max-width: 760px; width: 100%; border: 1px solid var(--line); }
.empty { padding: 20px; color: var(--mute); }
details { margin: 10px 0; }
summary { cursor: pointer; font-weight: 600; }
</style>
</head>
<body>
<header>
  <h1>spinelevel review report</h1>
  <div id="runinfo" class="mute"></div>
</header>
<main>
  <div class="cards" id="cards"></div>
  <div class="legend" id="legend"></div>
  <div class="chips" id="chips" aria-label="series per flag (click to filter)"></div>
  <details id="metrics" hidden><summary id="metrics-title">Evaluation</summary><div class="row" id="metrics-body"></div></details>
  <h2>Series</h2>
  <div class="controls">
    <label>Status <select id="f-status"></select></label>
    <label>Flag <select id="f-flag"></select></label>
    <label>Images <select id="f-images"></select></label>
    <label>Find <input id="f-q" type="search" placeholder="series or study UID" size="26"></label>
    <label>Rows <select id="f-size"><option>25</option><option selected>50</option><option>100</option><option>250</option><option>500</option></select></label>
    <span id="count" class="mute"></span>
  </div>
  <table id="series">
    <thead><tr id="series-head"></tr></thead>
    <tbody id="series-body"></tbody>
  </table>
  <div class="pager" id="pager"></div>
  <details id="skipped-section">
    <summary id="skipped-title">Skipped files</summary>
    <div class="controls" style="position:static"><label>Find <input id="s-q" type="search" placeholder="file or reason" size="30"></label><span id="s-count" class="mute"></span></div>
    <table id="skipped"><thead><tr><th>File</th><th>Reason</th></tr></thead><tbody id="skipped-body"></tbody></table>
    <div class="pager" id="s-pager"></div>
  </details>
</main>
<script type="application/json" id="report-data">/*DATA*/</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const rows = D.series;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const colour = (lv) => (D.colours && D.colours[lv]) || "#888";
  const fmt = (v, d) => (v == null || v === "" || Number.isNaN(v) ? "" : (typeof v === "number" ? v.toFixed(d) : String(v)));

  // ---- header ----
  const info = [];
  if (D.run.run_id) info.push("run " + D.run.run_id);
  if (D.run.finished) info.push("finished " + D.run.finished);
  if (D.run.model) info.push("model " + D.run.model);
  if (D.run.backend) info.push("backend " + D.run.backend);
  info.push("report written " + D.generated);
  $("runinfo").textContent = info.join(" \u00b7 ");
  const count = (f) => rows.reduce((n, r) => n + (f(r) ? 1 : 0), 0);
  const cards = [
    ["series", rows.length], ["classified", count((r) => r.status === "ok")],
    ["skipped", count((r) => r.status === "skipped")], ["failed", count((r) => r.status === "error")],
    ["flagged", count((r) => r.status === "ok" && r.flags.length > 0)], ["L3 picked", count((r) => r.l3_index != null)],
    ["images unavailable", count((r) => r.images === "unavailable")], ["skipped files", D.skipped.length],
  ];
  $("cards").innerHTML = cards.map(([k, v]) => '<div class="card"><b>' + esc(v) + "</b>" + esc(k) + "</div>").join("");
  $("legend").innerHTML = D.classes.map((c) => '<span><span class="sw" style="background:' + colour(c) + '"></span>' + esc(c) + "</span>").join("") +
    '<span class="mute">band: decoded level; ticks beside it: slices whose argmax disagrees (argmax colour); white line: L3 pick. Click a thumbnail for the full-size picture.</span>';

  // ---- metrics ----
  if (D.metrics) {
    const m = D.metrics, sec = $("metrics");
    const keys = [["accuracy_decoded", "accuracy (decoded)", 3], ["accuracy_argmax", "accuracy (argmax)", 3], ["l3_inside", "L3 pick inside L3", 3],
      ["l3_within_5mm", "L3 within 5 mm", 3], ["l3_within_10mm", "L3 within 10 mm", 3], ["l3_error_mm_median", "L3 error median (mm)", 1],
      ["l3_error_mm_mean", "L3 error mean (mm)", 1], ["n_series", "series evaluated", 0], ["n_slices", "slices evaluated", 0], ["l3_missed", "L3 missed", 0]];
    let h = "<table><tbody>";
    for (const [k, label, d] of keys) if (k in m) h += "<tr><th>" + esc(label) + "</th><td>" + esc(typeof m[k] === "number" ? fmt(m[k], d) : m[k]) + "</td></tr>";
    h += "</tbody></table>";
    if (m.per_class) {
      h += "<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr></thead><tbody>";
      for (const c of Object.keys(m.per_class)) {
        const p = m.per_class[c];
        h += '<tr><td><span class="sw" style="background:' + colour(c) + '"></span>' + esc(c) + "</td><td>" + fmt(p.precision, 3) + "</td><td>" + fmt(p.recall, 3) + "</td><td>" + fmt(p.f1, 3) + "</td><td>" + esc(p.support) + "</td></tr>";
      }
      h += "</tbody></table>";
    }
    if (D.confusion_png) h += '<a href="' + esc(D.confusion_png) + '" target="_blank" rel="noopener"><img src="' + esc(D.confusion_png) + '" alt="confusion matrix"></a>';
    $("metrics-body").innerHTML = h;
    const head = [];
    if (typeof m.accuracy_decoded === "number") head.push("accuracy " + fmt(m.accuracy_decoded, 3));
    if (typeof m.l3_within_10mm === "number") head.push("L3 within 10 mm " + fmt(m.l3_within_10mm, 3));
    if (m.n_series != null) head.push(m.n_series + " series evaluated");
    $("metrics-title").textContent = "Evaluation" + (head.length ? ": " + head.join(", ") : "") + " (click for the confusion matrix)";
    sec.hidden = false;
  }

  // ---- filters ----
  const flagCounts = {};
  for (const r of rows) for (const f of r.flags) flagCounts[f] = (flagCounts[f] || 0) + 1;
  const flagNames = Object.keys(flagCounts).sort();
  const opt = (v, label) => '<option value="' + esc(v) + '">' + esc(label) + "</option>";
  $("f-status").innerHTML = opt("", "all") + ["ok", "skipped", "error"].map((s) => opt(s, s + " (" + count((r) => r.status === s) + ")")).join("");
  $("f-flag").innerHTML = opt("", "any") + opt("__flagged", "flagged (" + count((r) => r.flags.length > 0) + ")") + opt("__none", "no flag (" + count((r) => r.flags.length === 0) + ")") +
    flagNames.map((f) => opt(f, f + " (" + flagCounts[f] + ")")).join("");
  $("f-images").innerHTML = opt("", "all") + ["ok", "unavailable", "not rendered", "none"].map((s) => opt(s, s + " (" + count((r) => r.images === s) + ")")).join("");
  $("chips").innerHTML = flagNames.map((f) => '<button class="chip" data-flag="' + esc(f) + '">' + esc(f) + " " + flagCounts[f] + "</button>").join("");

  const cols = [
    {key: "sag", label: "Sagittal"}, {key: "cor", label: "Coronal"}, {key: "ax", label: "L3 axial"},
    {key: "series_uid", label: "Series", sort: true}, {key: "status", label: "Status", sort: true},
    {key: "n_slices", label: "Slices", sort: true}, {key: "l3_index", label: "L3 index", sort: true},
    {key: "l3_z_mm", label: "L3 z (mm)", sort: true}, {key: "levels", label: "Levels"},
    {key: "n_flags", label: "Flags", sort: true}, {key: "n_disagree", label: "Argmax \u2260", sort: true},
  ];
  if (D.metrics) cols.push({key: "l3_error_mm", label: "L3 error (mm)", sort: true});
  const state = {status: "", flag: "", images: "", q: "", sort: "", dir: "asc", page: 1, size: 50};

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    for (const k of ["status", "flag", "images", "q", "sort", "dir"]) if (p.has(k)) state[k] = p.get(k);
    if (p.has("page")) state.page = Math.max(1, parseInt(p.get("page"), 10) || 1);
    if (p.has("size")) state.size = Math.max(1, parseInt(p.get("size"), 10) || 50);
  }
  function writeHash() {
    const p = new URLSearchParams();
    for (const k of ["status", "flag", "images", "q", "sort"]) if (state[k]) p.set(k, state[k]);
    if (state.sort && state.dir !== "asc") p.set("dir", state.dir);
    if (state.page > 1) p.set("page", state.page);
    if (state.size !== 50) p.set("size", state.size);
    const h = p.toString();
    history.replaceState(null, "", h ? "#" + h : location.pathname + location.search);
  }
  function sortValue(r, key) {
    if (key === "n_flags") return r.flags.length;
    const v = r[key];
    return v == null || v === "" ? null : v;
  }
  function filtered() {
    const q = state.q.trim().toLowerCase();
    let out = rows.filter((r) =>
      (!state.status || r.status === state.status) &&
      (!state.images || r.images === state.images) &&
      (!state.flag || (state.flag === "__flagged" ? r.flags.length > 0 : state.flag === "__none" ? r.flags.length === 0 : r.flags.includes(state.flag))) &&
      (!q || r.series_uid.toLowerCase().includes(q) || (r.study_uid || "").toLowerCase().includes(q)));
    if (state.sort) {
      const k = state.sort, sgn = state.dir === "desc" ? -1 : 1;
      out = out.slice().sort((a, b) => {
        const x = sortValue(a, k), y = sortValue(b, k);
        if (x === y) return 0;
        if (x === null) return 1;  // empty values last, either direction
        if (y === null) return -1;
        return (x < y ? -1 : 1) * sgn;
      });
    }
    return out;
  }
  function imgCell(r, kind) {
    if (r.images === "ok" && r.thumbs && r.thumbs[kind]) {
      const t = r.thumbs[kind];
      return '<td class="img has"><a href="' + esc(t.full) + '" target="_blank" rel="noopener"><img loading="lazy" decoding="async" src="' + esc(t.src) +
        '" width="' + t.w + '" height="' + t.h + '" alt="' + kind + " " + esc(r.series_uid) + '"></a></td>';
    }
    if (kind === "ax" && r.images === "ok") return '<td class="img has"><span class="na">no L3 pick</span></td>';
    if (kind !== "sag") return '<td class="img"></td>';
    const why = r.images === "unavailable" ? "images unavailable: " + (r.images_reason || "") : r.images === "not rendered" ? "not rendered" : "";
    return '<td class="img"><span class="na">' + esc(why) + "</span></td>";
  }
  function rowHtml(r) {
    let h = "<tr data-uid=\"" + esc(r.series_uid) + '" data-status="' + esc(r.status) + '" data-flags="' + esc(r.flags.join(" ")) + '">';
    h += imgCell(r, "sag") + imgCell(r, "cor") + imgCell(r, "ax");
    h += '<td class="uid">' + esc(r.series_uid) + '<br><span class="mute">study ' + esc(r.study_uid) + "</span>" +
      (r.extracted && r.extracted.length ? '<br><span class="mute">extracted:</span> ' + r.extracted.map((x) => '<a class="extracted" href="' + esc(x.png) + '" target="_blank" rel="noopener">' + esc(x.level) + "</a>").join(" ") : "") + "</td>";
    h += '<td class="st-' + esc(r.status) + '">' + esc(r.status) + (r.reason ? '<br><span class="mute">' + esc(r.reason) + "</span>" : "") + "</td>";
    h += "<td>" + esc(r.n_slices) + (r.slice_thickness_mm ? '<br><span class="mute">' + fmt(r.slice_thickness_mm, 2) + " mm</span>" : "") + "</td>";
    h += "<td>" + esc(r.l3_index) + (r.l3_first_index != null ? '<br><span class="mute">' + esc(r.l3_first_index) + "\u2013" + esc(r.l3_last_index) + "</span>" : "") + "</td>";
    h += "<td>" + fmt(r.l3_z_mm, 1) + "</td>";
    h += "<td>" + (r.levels_present || []).map((l) => '<span class="lv" style="background:' + colour(l) + '">' + esc(l) + "</span>").join("") + "</td>";
    h += "<td>" + r.flags.map((f) => '<span class="flag">' + esc(f) + "</span>").join("") + "</td>";
    h += "<td>" + esc(r.n_disagree) + "</td>";
    if (D.metrics) h += "<td>" + fmt(r.l3_error_mm, 1) + "</td>";
    return h + "</tr>";
  }
  function pager(el, page, pages, go) {
    el.innerHTML = '<button data-p="1">\u00ab first</button><button data-p="' + (page - 1) + '">\u2039 prev</button> page ' + page + " of " + pages +
      ' <button data-p="' + (page + 1) + '">next \u203a</button><button data-p="' + pages + '">last \u00bb</button>';
    for (const b of el.querySelectorAll("button")) {
      const p = parseInt(b.dataset.p, 10);
      b.disabled = p < 1 || p > pages || p === page;
      b.addEventListener("click", () => go(p));
    }
  }
  function renderHead() {
    $("series-head").innerHTML = cols.map((c) => {
      const arrow = state.sort === c.key ? (state.dir === "asc" ? " \u25b2" : " \u25bc") : "";
      return "<th" + (c.sort ? ' class="sort" data-key="' + c.key + '" title="sort"' : "") + ">" + esc(c.label) + '<span class="arrow">' + arrow + "</span></th>";
    }).join("");
    for (const th of document.querySelectorAll("th.sort")) th.addEventListener("click", () => {
      const k = th.dataset.key;
      if (state.sort === k) state.dir = state.dir === "asc" ? "desc" : "asc"; else { state.sort = k; state.dir = "asc"; }
      state.page = 1; render();
    });
  }
  function render() {
    const t0 = performance.now();
    const list = filtered();
    const pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.min(state.page, pages);
    const start = (state.page - 1) * state.size;
    const slice = list.slice(start, start + state.size);
    $("series-body").innerHTML = slice.length ? slice.map(rowHtml).join("") : '<tr><td class="empty" colspan="' + cols.length + '">no series match the filter</td></tr>';
    $("count").textContent = list.length ? "showing " + (start + 1) + "\u2013" + (start + slice.length) + " of " + list.length + (list.length !== rows.length ? " (filtered from " + rows.length + ")" : "") : "0 of " + rows.length;
    pager($("pager"), state.page, pages, (p) => { state.page = p; render(); window.scrollTo(0, $("series").offsetTop - 60); });
    for (const b of document.querySelectorAll(".chip")) b.classList.toggle("on", b.dataset.flag === state.flag);
    $("f-status").value = state.status; $("f-flag").value = state.flag; $("f-images").value = state.images; $("f-q").value = state.q; $("f-size").value = String(state.size);
    renderHead();
    writeHash();
    document.body.dataset.renderMs = (performance.now() - t0).toFixed(1);
    document.body.dataset.rows = String(list.length);
  }
  const on = (id, ev, f) => $(id).addEventListener(ev, f);
  on("f-status", "change", (e) => { state.status = e.target.value; state.page = 1; render(); });
  on("f-flag", "change", (e) => { state.flag = e.target.value; state.page = 1; render(); });
  on("f-images", "change", (e) => { state.images = e.target.value; state.page = 1; render(); });
  on("f-size", "change", (e) => { state.size = parseInt(e.target.value, 10); state.page = 1; render(); });
  let timer = 0;
  on("f-q", "input", (e) => { clearTimeout(timer); timer = setTimeout(() => { state.q = e.target.value; state.page = 1; render(); }, 150); });
  for (const b of document.querySelectorAll(".chip")) b.addEventListener("click", () => { state.flag = state.flag === b.dataset.flag ? "" : b.dataset.flag; state.page = 1; render(); });
  window.addEventListener("hashchange", () => { readHash(); render(); });

  // ---- skipped files ----
  const sk = {q: "", page: 1, size: 100};
  $("skipped-title").textContent = "Skipped files (" + D.skipped.length + ")";
  function renderSkipped() {
    const q = sk.q.trim().toLowerCase();
    const list = q ? D.skipped.filter((s) => s[0].toLowerCase().includes(q) || s[1].toLowerCase().includes(q)) : D.skipped;
    const pages = Math.max(1, Math.ceil(list.length / sk.size));
    sk.page = Math.min(sk.page, pages);
    const start = (sk.page - 1) * sk.size;
    $("skipped-body").innerHTML = list.slice(start, start + sk.size).map((s) => '<tr><td class="uid">' + esc(s[0]) + "</td><td>" + esc(s[1]) + "</td></tr>").join("") ||
      '<tr><td class="empty" colspan="2">none</td></tr>';
    $("s-count").textContent = list.length + " of " + D.skipped.length;
    pager($("s-pager"), sk.page, pages, (p) => { sk.page = p; renderSkipped(); });
  }
  on("s-q", "input", (e) => { sk.q = e.target.value; sk.page = 1; renderSkipped(); });
  renderSkipped();

  readHash();
  render();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
