"""The drift report as one self-contained HTML page: verdict, one line per drifted statistic, plots, outliers.

Histograms are inline SVG (no scripts, no CDN, readable offline and in any browser); intensity statistics are drawn
on a symmetric log scale, since scanners differ by orders of magnitude and a linear axis puts every case in one bar.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from mlops.monitoring.compare import DriftSummary, _values
from mlops.monitoring.stats import INTENSITY_COLUMNS

BINS = 24
W, H = 360, 120
CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}.verdict{padding:10px 14px;border-radius:6px;font-weight:600;display:inline-block}
.drift{background:#fde2e1;color:#8a1c13}.ok{background:#e1f5e4;color:#1b5e20}.na{background:#eee;color:#444}
table{border-collapse:collapse;margin:12px 0}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}
tr.drifted td{background:#fff4f3}.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #ddd;padding:6px}
tr.small td{background:#fffbe6}.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}"""


def _symlog(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log10(1 + np.abs(x))


def histogram_svg(ref: np.ndarray, cur: np.ndarray, log: bool) -> str:
    """Two overlaid histograms (reference grey, current red) as density, on a shared (optionally symlog) axis."""
    a, b = (_symlog(ref), _symlog(cur)) if log else (ref, cur)
    both = np.concatenate([a, b])
    lo, hi = float(both.min()), float(both.max())
    if not math.isfinite(lo) or hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, BINS + 1)
    parts = []
    for values, colour in ((a, "#888"), (b, "#d33")):
        if values.size == 0:
            continue
        counts, _ = np.histogram(values, edges)
        dens = counts / values.size
        for i, d in enumerate(dens):
            if d > 0:
                x, w, h = i * W / BINS, W / BINS, d * (H - 14)
                parts.append(f'<rect x="{x:.1f}" y="{H - 14 - h:.1f}" width="{w:.1f}" height="{h:.1f}" '
                             f'fill="{colour}" fill-opacity="0.55"/>')  # fmt: skip

    def tick(v: float) -> str:
        return f"{(np.sign(v) * (10 ** abs(v) - 1)):.3g}" if log else f"{v:.3g}"

    parts.append(f'<text x="0" y="{H - 2}" font-size="10">{tick(lo)}</text>')
    parts.append(f'<text x="{W}" y="{H - 2}" font-size="10" text-anchor="end">{tick(hi)}</text>')
    scale = " (log scale)" if log else ""
    parts.append(f'<text x="{W / 2}" y="{H - 2}" font-size="10" text-anchor="middle">{scale}</text>')
    return f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">{"".join(parts)}</svg>'


def render(summary: DriftSummary, reference: list[dict], current: list[dict]) -> str:
    e = html.escape
    title = (f"Drift report: {summary.model or 'model'} - {summary.current_rows} current vs "
             f"{summary.reference_rows} reference cases")  # fmt: skip
    css = {"drift": "drift", "no drift": "ok"}.get(summary.verdict, "na")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>",
           f"<p class='verdict {css}'>Verdict: {e(summary.verdict)}</p>",
           f"<p>{len(summary.drifted_columns)} of {len(summary.columns)} statistics drifted (share "
           f"{summary.drift_share:.2f}, limit {summary.max_drift_share:.2f}). Multiple-testing correction: "
           f"{e(summary.correction)}. A statistic drifts when it is significant after the correction and its "
           f"values moved by at least {summary.min_shift_sd:g} reference SD; significant smaller moves are listed "
           f"as small shifts. Minimum current sample size for a verdict: {summary.min_samples}.</p>",
           "<ul>", *(f"<li>{e(line)}</li>" for line in summary.summary_lines), "</ul>",
           "<h2>Statistics (drifted first)</h2><table><tr><th>statistic</th><th>test</th><th>p</th>"
           "<th>adjusted p</th><th>reference median</th><th>current median</th><th>shift (reference SD)</th>"
           "<th>drifted</th></tr>"]  # fmt: skip
    for c in summary.columns:
        med = ["" if v is None else f"{v:.4g}" for v in (c.reference_median, c.current_median)]
        mark, row = {"drifted": ("yes", "drifted"), "small shift": ("small shift", "small")}.get(c.status, ("no", ""))
        out.append(f"<tr class='{row}'><td>{e(c.label)} <small>({e(c.column)})</small>"
                   f"</td><td>{e(c.test)}</td><td>{c.p_value:.2g}</td><td>{c.score:.2g}</td><td>{med[0]}</td>"
                   f"<td>{med[1]}</td><td>{c.shift_text}</td><td>{mark}</td></tr>")  # fmt: skip
    out.append("</table><h2>Cases furthest from the reference</h2><table><tr><th>case</th><th>robust z</th>"
               "<th>statistic</th><th>value</th><th>reference median</th></tr>")  # fmt: skip
    for o in summary.outliers:
        out.append(f"<tr><td>{e(o.case)}</td><td>{o.score:.1f}</td><td>{e(o.column)}</td><td>{o.value:.4g}</td>"
                   f"<td>{o.reference_median:.4g}</td></tr>")  # fmt: skip
    out.append("</table><h2>Distributions</h2><p class='legend'><span style='background:#888'></span>reference"
               "<span style='background:#d33'></span>current</p><div class='plots'>")  # fmt: skip
    for c in summary.columns:
        if c.test != "K-S":
            continue
        ref, cur = _values(reference, c.column), _values(current, c.column)
        svg = histogram_svg(ref, cur, c.column in INTENSITY_COLUMNS)
        out.append(f"<div class='plot'><div>{e(c.label)}{' - drifted' if c.drifted else ''}</div>{svg}</div>")
    out.append("</div></body></html>")
    return "\n".join(out)


def write_report(summary: DriftSummary, reference: list[dict], current: list[dict], path: Path) -> Path:
    """Write the page atomically; ``summary.html`` records where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(summary, reference, current))
    tmp.replace(path)
    summary.html = str(path)
    return path
