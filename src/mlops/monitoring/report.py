"""The drift report page: our verdict, alarms and outliers on top, then Evidently's data drift report.

The page is Evidently's self-contained HTML (its scripts inline, no CDN, readable offline) with a static section
before it for what Evidently has no widget for: the verdict, the cases outside the reference's range and the cases
furthest from it. Evidently's snapshot is saved beside the page (``Snapshot.load`` and Evidently's UI read it).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from mlops.files import write_atomic
from mlops.monitoring.compare import DriftSummary

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

CSS = """#mlops-verdict{font:14px system-ui,sans-serif;margin:24px auto;color:#222;max-width:1200px;padding:0 18px}
#mlops-verdict h1{font-size:22px}#mlops-verdict h2{font-size:17px;margin-top:18px}
#mlops-verdict .badge{padding:8px 12px;border-radius:6px;font-weight:600;display:inline-block;margin-right:8px}
#mlops-verdict .drift{background:#fde2e1;color:#8a1c13}#mlops-verdict .ok{background:#e1f5e4;color:#1b5e20}
#mlops-verdict .na{background:#eee;color:#444}#mlops-verdict table{border-collapse:collapse;margin:8px 0}
#mlops-verdict td,#mlops-verdict th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}"""


def verdict_section(summary: DriftSummary) -> str:
    """Our verdict, alarms and outliers as static HTML, shown above Evidently's report."""
    e = html.escape
    title = (f"Drift report: {summary.model or 'model'} - {summary.current_rows} current vs "
             f"{summary.reference_rows} reference cases")  # fmt: skip
    css = {"drift": "drift", "no drift": "ok"}.get(summary.verdict, "na")
    out = [f"<section id='mlops-verdict'><style>{CSS}</style><h1>{e(title)}</h1>",
           f"<p><span class='badge {css}'>Verdict: {e(summary.verdict)}</span>"]  # fmt: skip
    if summary.out_of_range:
        out.append(f"<span class='badge drift'>Out of range: {len(summary.cases_out_of_range)} case(s)</span>")
    out.append(
        f"</p><p>{len(summary.drifted_columns)} of {len(summary.columns)} statistics drifted (share "
        f"{summary.drift_share:.2f}, limit {summary.max_drift_share:.2f}). A statistic drifts when its K-S p-value is "
        f"under the Benjamini-Hochberg cut-off ({summary.bh_cutoff:.3g}; {e(summary.correction)}) and its values "
        f"moved by at least {summary.min_shift_sd:g} reference SD (log scale for raw intensities); smaller "
        f"significant moves are small shifts. A verdict needs at least {summary.min_samples} current cases; each "
        f"case is also checked alone against the reference's range (margin {summary.range_margin:g}).</p><ul>"
    )
    out += [f"<li>{e(line)}</li>" for line in summary.summary_lines]
    out.append("</ul>")
    if summary.out_of_range:
        out.append("<h2>Cases outside the reference's range</h2><table><tr><th>case</th><th>statistic</th>"
                   "<th>value</th><th>reference range</th><th>limits</th></tr>")  # fmt: skip
        for a in summary.out_of_range:
            out.append(
                f"<tr><td>{e(a.case)}</td><td>{e(a.label)}</td><td>{a.value:.4g}</td><td>"
                f"{a.reference_min:.4g} .. {a.reference_max:.4g}</td><td>{a.low:.4g} .. {a.high:.4g}</td></tr>"
            )
        out.append("</table>")
    if summary.outliers:
        out.append("<h2>Cases furthest from the reference</h2><table><tr><th>case</th><th>robust z</th>"
                   "<th>statistic</th><th>value</th><th>reference median</th></tr>")  # fmt: skip
        for o in summary.outliers:
            out.append(f"<tr><td>{e(o.case)}</td><td>{o.score:.1f}</td><td>{e(o.column)}</td><td>{o.value:.4g}</td>"
                       f"<td>{o.reference_median:.4g}</td></tr>")  # fmt: skip
        out.append("</table>")
    out.append("<h2>Evidently data drift report</h2><p>Drift score: the shift in reference SD (the orientation "
               "code: the p-value of unseen codes); the stat test's name states the rule.</p></section>")  # fmt: skip
    return "".join(out)


def render(summary: DriftSummary, reference: list[dict], current: list[dict], snap: Snapshot | None = None) -> str:
    """The whole page: our section, then Evidently's report (or only our section when nothing could be compared)."""
    if snap is None:
        from mlops.monitoring.evidently_report import snapshot  # seconds of imports: only when a report is built

        snap = snapshot(summary, reference, current)
    section = verdict_section(summary)
    if snap is None:
        title = html.escape(f"Drift report: {summary.model or 'model'}")
        return f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title></head><body>" \
               f"{section}</body></html>"  # fmt: skip
    page = snap.get_html_str(as_iframe=False)
    return page.replace("<body>", "<body>" + section, 1)


def write_report(summary: DriftSummary, reference: list[dict], current: list[dict], path: Path) -> Path:
    """Write the page and, beside it, Evidently's snapshot (``<stem>_evidently.json``, ``Snapshot.load`` reads it),
    each atomically; ``summary.html`` and ``summary.snapshot`` record where."""
    from mlops.monitoring.evidently_report import snapshot  # seconds of imports: only when a report is built

    path.parent.mkdir(parents=True, exist_ok=True)
    snap = snapshot(summary, reference, current)
    outputs = [(path, render(summary, reference, current, snap))]
    if snap is not None:
        outputs.append((path.with_name(path.stem + "_evidently.json"), snap.dumps()))
    for target, text in outputs:
        write_atomic(target, text)
    summary.html = str(path)
    summary.snapshot = str(outputs[1][0]) if snap is not None else ""
    return path
