"""The sequence-length explorer: one self-contained HTML page of measured time, memory and error.

:func:`explorer_html` turns the rows of :func:`linattn.compare.run_compare` into a page
with a slider over the measured lengths; moving it shows, side by side for each method,
its time, its peak memory and its error at that length, with bars relative to the
largest value at that length and small log-log charts of all lengths. The data is
embedded as JSON, the style and the script are inline, and nothing is fetched: the
file opens offline. The fragment ``#T=1024`` selects a length when the page opens.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from linattn.compare import CompareRow

__all__ = ["explorer_html", "write_explorer"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #1d2330; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.settings { color: #555; margin-bottom: 1.2em; }
.control { display: flex; align-items: center; gap: 1em; font-size: 1.2em; margin: 1em 0; }
#slider { flex: 1; }
#T { font-weight: bold; min-width: 6em; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 0.35em 0.6em; text-align: left; border-bottom: 1px solid #dde; }
td.num { text-align: right; font-variant-numeric: tabular-nums; width: 7em; }
td.barcell { width: 12em; }
.bar { height: 0.9em; background: #4c72b0; border-radius: 2px; }
.bar.memory { background: #dd8452; }
.bar.error { background: #55a868; }
tr.best td.method { font-weight: bold; }
.charts { display: flex; gap: 1em; flex-wrap: wrap; margin-top: 1.5em; }
.chart { flex: 1; min-width: 18em; }
.chart h2 { font-size: 1em; margin: 0.2em 0; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: 1.5em; height: 0.25em; vertical-align: middle; margin-right: 0.3em; }
.note { color: #555; font-size: 0.9em; margin-top: 1.5em; }
"""

# Plain ES5 on purpose: any browser, no build step, no library.
_SCRIPT = r"""
(function () {
  var data = JSON.parse(document.getElementById("data").textContent);
  var rows = data.rows, settings = data.settings;
  var lengths = [], methods = [];
  rows.forEach(function (r) {
    if (lengths.indexOf(r.length) < 0) lengths.push(r.length);
    if (methods.indexOf(r.method) < 0) methods.push(r.method);
  });
  lengths.sort(function (a, b) { return a - b; });
  var colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                "#ccb974", "#64b5cd", "#1d2330", "#a1c9f4"];
  var fields = [
    {key: "seconds", label: "time (ms)", scale: 1e3, digits: 3, cls: "time"},
    {key: "peak_bytes", label: "peak memory (MiB)", scale: 1 / 1048576, digits: 3, cls: "memory"},
    {key: "rel_error", label: "relative error", scale: 1, digits: 2, cls: "error", exp: true, log: true}
  ];
  function row(method, length) {
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].method === method && rows[i].length === length) return rows[i];
    }
    return null;
  }
  function format(value, field) {
    var x = value * field.scale;
    return field.exp ? x.toExponential(field.digits) : x.toPrecision(field.digits);
  }
  var slider = document.getElementById("slider");
  slider.max = String(lengths.length - 1);
  var body = document.getElementById("body");
  function render() {
    var length = lengths[Number(slider.value)];
    document.getElementById("T").textContent = "T = " + length;
    var present = methods.filter(function (m) { return row(m, length) !== null; });
    var fastest = null;
    present.forEach(function (m) {
      if (fastest === null || row(m, length).seconds < row(fastest, length).seconds) fastest = m;
    });
    var out = "";
    present.forEach(function (m) {
      var r = row(m, length);
      out += '<tr data-method="' + m + '"' + (m === fastest ? ' class="best"' : "") + '><td class="method">' + m +
             "</td>";
      fields.forEach(function (f) {
        var all = present.map(function (n) { return row(n, length)[f.key]; });
        var largest = Math.max.apply(null, all), width = largest > 0 ? Math.max(1, 100 * r[f.key] / largest) : 0;
        if (f.log && largest > 0) {  // errors span decades: bars on a log scale, from a decade below the least
          var least = Math.min.apply(null, all.filter(function (x) { return x > 0; })) / 10;
          width = r[f.key] > 0 ? Math.max(1, 100 * Math.log(r[f.key] / least) / Math.log(largest / least)) : 0;
        }
        out += '<td class="num" data-field="' + f.key + '">' + format(r[f.key], f) + '</td><td class="barcell">' +
               '<div class="bar ' + f.cls + '" style="width:' + width.toFixed(1) + '%"></div></td>';
      });
      out += "<td>" + r.error_against + "</td></tr>";
    });
    body.innerHTML = out;
    fields.forEach(function (f) { chart(f, length); });
  }
  function chart(field, current) {
    var w = 300, h = 190, left = 44, right = 8, top = 8, bottom = 28;
    var values = rows.map(function (r) { return r[field.key] * field.scale; }).filter(function (x) { return x > 0; });
    var lo = Math.log10(Math.min.apply(null, values)), hi = Math.log10(Math.max.apply(null, values));
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    var tlo = Math.log10(lengths[0]), thi = Math.log10(lengths[lengths.length - 1]);
    if (thi - tlo < 1e-9) { tlo -= 0.5; thi += 0.5; }
    function X(t) { return left + (w - left - right) * (Math.log10(t) - tlo) / (thi - tlo); }
    function Y(v) { return top + (h - top - bottom) * (1 - (Math.log10(v) - lo) / (hi - lo)); }
    var svg = '<svg width="100%" viewBox="0 0 ' + w + " " + h + '" role="img">';
    svg += '<rect x="' + left + '" y="' + top + '" width="' + (w - left - right) + '" height="' + (h - top - bottom) +
           '" fill="#f7f8fb" stroke="#ccd"/>';
    svg += '<line x1="' + X(current) + '" x2="' + X(current) + '" y1="' + top + '" y2="' + (h - bottom) +
           '" stroke="#c44e52" stroke-dasharray="4 3"/>';
    methods.forEach(function (m, i) {
      var points = lengths.map(function (t) {
        var r = row(m, t);
        return r && r[field.key] > 0 ? [t, r[field.key]] : null;
      }).filter(function (p) { return p !== null; });
      if (!points.length) return;
      var path = points.map(function (p) { return X(p[0]).toFixed(1) + "," + Y(p[1] * field.scale).toFixed(1); });
      svg += '<polyline fill="none" stroke-width="1.8" stroke="' + colors[i % colors.length] + '" points="' +
             path.join(" ") + '"/>';
    });
    svg += '<text x="' + left + '" y="' + (h - 8) + '" font-size="10">T = ' + lengths[0] + '</text>';
    svg += '<text x="' + (w - right) + '" y="' + (h - 8) + '" font-size="10" text-anchor="end">' +
           lengths[lengths.length - 1] + '</text>';
    svg += '<text x="' + (left - 4) + '" y="' + (top + 10) + '" font-size="10" text-anchor="end">' +
           Math.pow(10, hi).toPrecision(2) + '</text>';
    svg += '<text x="' + (left - 4) + '" y="' + (h - bottom) + '" font-size="10" text-anchor="end">' +
           Math.pow(10, lo).toPrecision(2) + '</text></svg>';
    document.getElementById("chart-" + field.key).innerHTML = svg;
  }
  var legend = "";
  methods.forEach(function (m, i) {
    legend += '<span><i style="background:' + colors[i % colors.length] + '"></i>' + m + "</span>";
  });
  document.getElementById("legend").innerHTML = legend;
  function fromFragment() {
    var match = /T=(\d+)/.exec(window.location.hash);
    if (!match) return;
    var wanted = Number(match[1]), best = 0;
    lengths.forEach(function (t, i) { if (Math.abs(t - wanted) < Math.abs(lengths[best] - wanted)) best = i; });
    slider.value = String(best);
    slider.dispatchEvent(new Event("input"));
  }
  slider.addEventListener("input", render);
  window.addEventListener("hashchange", fromFragment);
  slider.value = "0";
  render();
  fromFragment();
})();
"""


def _describe(settings: Mapping[str, Any]) -> str:
    parts = [f"B = {settings.get('batch', '?')}", f"H = {settings.get('heads', '?')}",
             f"D = {settings.get('dim', '?')}", str(settings.get("dtype", "")),
             "causal" if settings.get("causal", True) else "non-causal",
             f"time = best of {settings.get('repeats', '?')} calls"]
    return ", ".join(p for p in parts if p)


def explorer_html(rows: Sequence[CompareRow], settings: Mapping[str, Any], *, title: str = "") -> str:
    """The explorer page for measured ``rows`` (and the ``settings`` that produced them), as text.

    Parameters
    ----------
    rows : sequence of CompareRow
        From :func:`linattn.compare.run_compare` (or read back from ``linattn compare --json``).
    settings : mapping
        The measurement settings (batch, heads, dim, dtype, causal, repeats), shown on the page.
    title : str, optional
        The page's heading.

    Returns
    -------
    str
        A complete HTML document with no external resources.

    Examples
    --------
    >>> from linattn.compare import CompareRow
    >>> from linattn.explore import explorer_html
    >>> page = explorer_html([CompareRow("softmax", 16, 1e-7, 1e-4, 4096)], {"dtype": "float32"})
    >>> page.startswith("<!DOCTYPE html>") and "http" not in page
    True
    """
    if not rows:
        raise ValueError("rows must hold at least one measurement, got none")
    payload = json.dumps({"settings": dict(settings), "rows": [asdict(r) for r in rows]})
    payload = payload.replace("</", "<\\/")  # the JSON cannot close its <script> element
    heading = html.escape(title or "linattn: time, memory and error against sequence length")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{heading}</h1>
<div class="settings">{html.escape(_describe(settings))}; error relative to float64 exact softmax, or for methods
that do not approximate it to their own float64 definition; memory = peak traced by tracemalloc during one call.</div>
<div class="control"><label for="slider">sequence length</label>
<input type="range" id="slider" min="0" max="0" step="1" value="0"><span id="T"></span></div>
<table>
<thead><tr><th>method</th><th colspan="2">time (ms)</th><th colspan="2">peak memory (MiB)</th>
<th colspan="2">relative error</th><th>against</th></tr></thead>
<tbody id="body"></tbody>
</table>
<div class="charts">
<div class="chart"><h2>time (ms)</h2><div id="chart-seconds"></div></div>
<div class="chart"><h2>peak memory (MiB)</h2><div id="chart-peak_bytes"></div></div>
<div class="chart"><h2>relative error</h2><div id="chart-rel_error"></div></div>
</div>
<div class="legend" id="legend"></div>
<div class="note">Measured by <code>linattn explore</code>; every number on this page is in the data below it.
The dashed line marks the length the slider selects; bars compare the methods at that length
(time and memory on a linear scale, error on a log scale).</div>
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_explorer(path: str, rows: Sequence[CompareRow], settings: Mapping[str, Any], *, title: str = "") -> None:
    """Write :func:`explorer_html` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(explorer_html(rows, settings, title=title))
