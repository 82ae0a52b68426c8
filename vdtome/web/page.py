"""How the result page draws a comparison: HTML for the headline cards, the metrics table and the
colour bar, Vega-Lite charts (Altair) for latency, per-frame PSNR and the session's runs.

Renders only: every figure comes from a :class:`vdtome.web.ui.ComparisonView` or a history record.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import altair as alt
import pandas as pd

from vdtome.engine.fidelity import PSNR_CAP_DB
from vdtome.engine.report import COLUMNS
from vdtome.engine.video_io import heat_scale_stops
from vdtome.measure.stats import Verdict
from vdtome.web.ui import CLAIMS, PLOT_SPEEDUP, ComparisonView

# Charts draw as SVG: crisp in screenshots, and their marks are elements a test can count.
SVG = {"embedOptions": {"renderer": "svg", "actions": False}}
SIDE_COLOURS = {"baseline": "#64748b", "accelerated": "#4f46e5"}
PSNR_AXIS = "PSNR vs baseline (dB)"


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def cards_html(view: ComparisonView | None, status: str = "") -> str:
    """The headline figures in coloured cards, under a line naming what they belong to."""
    if view is None:
        return f'<div id="headline" class="headline empty"><p>{_escape(status or "No result yet: press Run comparison.")}</p></div>'
    cards = "".join(
        f'<div class="card tone-{card.tone}" data-tone="{card.tone}"><div class="card-title">{_escape(card.title)}</div>'
        f'<div class="card-value">{_escape(card.value)}</div><div class="card-detail">{_escape(card.detail)}</div></div>'
        for card in view.cards)
    error = f'<p class="result-error"><b>Error:</b> {_escape(view.error)}</p>' if view.error else ""
    if view.busy:  # one line; the details folded under it
        details = "".join(f"<p>{_escape(w)}</p>" for w in view.warnings)
        warnings = (f'<details class="result-warning"><summary><b>Unreliable timing:</b> {_escape(view.busy)}'
                    f"</summary>{details}</details>")
    else:
        warnings = "".join(f'<p class="result-warning"><b>Measurement warning:</b> {_escape(w)}</p>'
                           for w in view.warnings)
    head = f'<p class="result-title">{_escape(status)}{_escape(view.title)}</p>'
    return f'<div id="headline" class="headline">{head}{error}{warnings}<div class="cards">{cards}</div></div>'


def refusal_html(message: str, element: str, label: str, panels: Sequence[str] = ()) -> str:
    """Why Run was refused, beside the Run button, with a link that opens the folded groups
    ``panels`` (element ids, outermost first) and scrolls to the field's element."""
    return (f'<div id="refusal" class="refusal" role="alert"><b>Not run:</b> {_escape(message)} '
            f'<a href="#{_escape(element)}" data-field="{_escape(element)}" data-panels="{_escape(" ".join(panels))}">'
            f'Go to {_escape(label)}</a></div>')


def metrics_html(rows: Sequence[Sequence[str]]) -> str:
    """Every metric row (no inner scroll); on a narrow screen each row becomes a block of labelled
    values (the CSS in :data:`CSS`)."""
    return table_html(COLUMNS, rows, "metrics")


def table_html(columns: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    """A table whose first column heads each row, styled as the metrics table (stacked on a phone)."""
    head = "".join(f"<th>{_escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = [f'<th scope="row">{_escape(row[0])}</th>']
        cells += [f'<td data-label="{_escape(column)}">{_escape(value)}</td>' for column, value in zip(columns[1:], row[1:])]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="{table_id}" class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table>")


def colour_bar_html(largest: float | None) -> str:
    """The difference heat map's scale: its colours from 0 to the clip's largest difference."""
    if largest is None:
        return ""
    stops = ", ".join(heat_scale_stops())
    if largest == 0:
        labels = "<span>0: the videos are identical (the heat map is uniformly dark)</span>"
    else:
        labels = "".join(f"<span>{value:.3g}</span>" for value in (0.0, largest / 2, largest))
    return (f'<div id="colour-bar" class="colour-bar"><div class="bar" style="background: linear-gradient(to right, '
            f'{stops})"></div><div class="bar-labels">{labels}</div><div class="bar-caption">|baseline - accelerated| '
            f"per pixel, mean over RGB, in 0-1 pixel units; colours normalised to this clip's largest difference "
            f"({largest * 255:.2g} of 255 levels)</div></div>")


def latency_chart(view: ComparisonView | None) -> alt.Chart | None:
    """Each side's phases stacked: where the time goes and which phase the method changed."""
    if view is None or not view.latency:
        return None
    data = pd.DataFrame(view.latency, columns=["side", "phase", "seconds"])
    return alt.Chart(data, title="Latency by phase (medians of this request's calls)").mark_bar().encode(
        y=alt.Y("side:N", sort=["baseline", "accelerated"], title=None),
        x=alt.X("sum(seconds):Q", title="seconds"),
        color=alt.Color("phase:N", title="phase"),
        order=alt.Order("phase:N"),
        tooltip=["side", "phase", alt.Tooltip("seconds:Q", format=".3f")],
    ).properties(height=110, usermeta=SVG)


def frame_psnr_chart(view: ComparisonView | None, frame: int | None = None) -> alt.LayerChart | None:
    """PSNR of every frame against the baseline's, the picked frame marked."""
    if view is None or not view.frame_psnr:
        return None
    data = pd.DataFrame({"frame": range(len(view.frame_psnr)), PSNR_AXIS: view.frame_psnr})
    base = alt.Chart(data).encode(
        x=alt.X("frame:Q", title="frame", scale=alt.Scale(nice=False, padding=8), axis=alt.Axis(tickMinStep=1)),
        y=alt.Y(f"{PSNR_AXIS}:Q", scale=alt.Scale(zero=False, padding=10), title="PSNR (dB)"),
        tooltip=["frame", alt.Tooltip(f"{PSNR_AXIS}:Q", format=".2f")],
    )
    layers = [base.mark_line(color=SIDE_COLOURS["accelerated"]), base.mark_point(filled=True, size=40)]
    if frame is not None and 0 <= frame < len(view.frame_psnr):
        layers.append(alt.Chart(pd.DataFrame({"frame": [frame]})).mark_rule(color="#dc2626").encode(x="frame:Q"))
    title = "PSNR per frame (capped at %g dB: identical frames)" % PSNR_CAP_DB
    return alt.layer(*layers, title=title).properties(height=160, usermeta=SVG)


def _differing(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per record, the settings whose value is not the same in every record, as text."""
    keys = sorted({key for r in records for key in r.get("settings", {})})
    varying = [k for k in keys if len({r.get("settings", {}).get(k) for r in records}) > 1]
    def shown(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 40 else text[:39] + "…"

    return ["; ".join(f"{k}={shown(r.get('settings', {}).get(k, 'n/a'))}" for k in varying) or "(same settings)"
            for r in records]


def history_points(history: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The chart's points: every run with a speedup and a PSNR, its interval and what it claims;
    identical videos (ratio 0) are the anchor at the PSNR cap."""
    records = [r for r in history if r.get("point") is not None]
    rows = []
    for record, differs in zip(records, _differing(records)):
        point = record["point"]
        psnr = point[PSNR_AXIS]
        verdict = next((v for v in Verdict if v.value == point["verdict"]), None)  # a stored point may be older
        claim = point.get("claim") or (CLAIMS[verdict] if verdict is not None else str(point["verdict"]))
        rows.append({
            "run": point["run"], PSNR_AXIS: psnr, PLOT_SPEEDUP: point[PLOT_SPEEDUP],
            "low": point.get("low"), "high": point.get("high"),
            "interval": point["interval"], "verdict": point["verdict"], "claim": claim,
            "tested": verdict is not None and verdict.tested, "methods": point["methods"],
            "series": record.get("series") or "single runs", "sweep": bool(record.get("series")),
            "anchor": psnr >= PSNR_CAP_DB, "what differs": differs,
        })
    return pd.DataFrame(rows, columns=["run", PSNR_AXIS, PLOT_SPEEDUP, "low", "high", "interval", "verdict", "claim",
                                       "tested", "methods", "series", "sweep", "anchor", "what differs"])


def history_chart(history: Sequence[dict[str, Any]], scope: str = "") -> alt.LayerChart | None:
    """Speedup against fidelity: a 1x line; every point with its interval (a vertical bar); tested
    verdicts as filled marks in their sweep's colour, shaped by what they claim; untested runs
    (crosses) and runs whose method did nothing (squares) as open grey marks (their ratio is noise,
    not a speed); each sweep a connected curve; identical-output runs at the PSNR cap. Fills its container's width,
    legends below the plot (readable at a phone's 390 px). ``scope``: what the runs share (one model
    and size: only those compare), named in the title."""
    data = history_points(history)
    if data.empty:
        return None
    x_title = ["PSNR vs baseline (dB)", f"identical videos at the {PSNR_CAP_DB:g} dB cap"] if data["anchor"].any() \
        else "PSNR vs baseline (dB)"
    x = alt.X(f"{PSNR_AXIS}:Q", title=x_title, scale=alt.Scale(zero=False, padding=24, nice=False),
              axis=alt.Axis(format=".1~f", tickCount=6))
    y = alt.Y(f"{PLOT_SPEEDUP}:Q", title=["end-to-end speedup", "(below 1 = slower)"],
              scale=alt.Scale(zero=False, padding=24, nice=False))
    tooltip = ["run", "methods", alt.Tooltip(f"{PLOT_SPEEDUP}:Q", format=".3f", title="speedup (median)"), "interval",
               "claim", alt.Tooltip(f"{PSNR_AXIS}:Q", format=".2f"), "what differs", "series"]
    colour = alt.Color("series:N", title="series", legend=alt.Legend(labelLimit=320))
    base = alt.Chart(data).encode(x=x, y=y, tooltip=tooltip)
    tested = base.transform_filter("datum.tested")
    untested = base.transform_filter("!datum.tested")
    one = alt.Chart(pd.DataFrame({PLOT_SPEEDUP: [1.0]})).mark_rule(strokeDash=[6, 4], color="#475569").encode(
        y=f"{PLOT_SPEEDUP}:Q")
    claim_order = list(CLAIMS.values())
    shapes = alt.Scale(domain=claim_order, range=["triangle-up", "triangle-down", "circle", "cross", "square"])
    layers = [
        one,
        tested.transform_filter("datum.low != null").mark_rule(strokeWidth=2, opacity=0.6).encode(
            y="low:Q", y2="high:Q", color=colour),
        untested.transform_filter("datum.low != null").mark_rule(strokeWidth=1, strokeDash=[2, 2],
                                                                 color="#94a3b8").encode(y="low:Q", y2="high:Q"),
        base.transform_filter("datum.sweep").mark_line(strokeWidth=1.5, opacity=0.7).encode(
            order="run:Q", detail="series:N", color=colour),
        tested.mark_point(filled=True, size=90, opacity=1).encode(
            color=colour, shape=alt.Shape("claim:N", title="what the run shows", scale=shapes,
                                          legend=alt.Legend(labelLimit=320))),
        untested.mark_point(filled=False, size=90, color="#64748b", strokeWidth=1.5).encode(
            shape=alt.Shape("claim:N", scale=shapes)),
    ]
    if data["anchor"].any():
        cap = alt.Chart(pd.DataFrame({PSNR_AXIS: [PSNR_CAP_DB], "label": ["PSNR cap"]}))
        layers += [cap.mark_rule(color="#94a3b8", strokeDash=[2, 2]).encode(x=f"{PSNR_AXIS}:Q"),
                   cap.mark_text(align="right", dx=-4, dy=-6, color="#475569", baseline="bottom").encode(
                       x=f"{PSNR_AXIS}:Q", y=alt.value(0), text="label:N")]
    title = alt.TitleParams("Speedup against fidelity", subtitle=[
        *([f"runs of {scope}"] if scope else []), "bars: each run's interval; open grey marks:",
        "not tested or did nothing (no claim)"])
    return alt.layer(*layers, title=title).resolve_scale(shape="shared").properties(
        height=320, width="container", usermeta=SVG).configure_legend(orient="bottom", direction="vertical", columns=1)


CSS = """
#vdtome-title h1 { margin-bottom: 0.2em; }
.headline .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 8px; }
.headline .card { border-radius: 8px; padding: 8px 10px; border: 1px solid var(--border-color-primary);
  background: var(--background-fill-secondary); }
.headline .card-title { font-size: 0.8em; opacity: 0.8; }
.headline .card-value { font-size: 1.35em; font-weight: 700; font-variant-numeric: tabular-nums; }
.headline .card-detail { font-size: 0.75em; opacity: 0.85; }
.headline .tone-better { background: #dcfce7; border-color: #16a34a; color: #14532d; }
.headline .tone-worse { background: #fee2e2; border-color: #dc2626; color: #7f1d1d; }
.headline .tone-neutral { background: #f1f5f9; border-color: #94a3b8; color: #1e293b; }
.headline .tone-untested { background: #f8fafc; border: 1px dashed #94a3b8; color: #475569; }
.headline .tone-untested .card-value { font-weight: 400; font-style: italic; }
.headline .tone-unreliable { background: #fffbeb; border: 1px dashed #d97706; color: #78350f; }
.headline .tone-unreliable .card-value { font-weight: 600; font-size: 1.1em; }
.headline details.result-warning summary { cursor: pointer; }
.headline details.result-warning p { margin: 4px 0 0 0; }
.headline .result-title { margin: 0 0 6px 0; font-weight: 600; }
.headline.stale { opacity: 0.55; }
.headline .result-error { color: #b91c1c; }
.headline .result-warning { background: #fef3c7; border: 1px solid #d97706; color: #78350f; border-radius: 6px;
  padding: 4px 8px; font-size: 0.85em; }
.refusal { background: #fee2e2; border: 1px solid #dc2626; color: #7f1d1d; border-radius: 8px; padding: 8px 10px; }
.refusal a { font-weight: 600; color: #991b1b; text-decoration: underline; margin-left: 4px; }
/* toasts at the bottom of the screen, never over the headline cards */
.toast-wrap { top: auto !important; bottom: var(--size-4, 16px) !important; }
table.metrics { width: 100%; border-collapse: collapse; font-size: 0.85em; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border-bottom: 1px solid var(--border-color-primary); padding: 4px 6px;
  text-align: left; vertical-align: top; }
table.metrics thead th { background: var(--background-fill-secondary); }
@media (max-width: 700px) {
  table.metrics thead { display: none; }
  table.metrics tr { display: block; border-bottom: 2px solid var(--border-color-primary); padding: 4px 0; }
  table.metrics th, table.metrics td { display: block; border: none; padding: 1px 4px; }
  table.metrics td:empty { display: none; }
  table.metrics td::before { content: attr(data-label) ": "; font-weight: 600; }
}
.colour-bar .bar { height: 12px; border-radius: 3px; }
.colour-bar .bar-labels { display: flex; justify-content: space-between; font-size: 0.8em; }
.colour-bar .bar-caption { font-size: 0.75em; opacity: 0.8; }
#side-by-side video, #baseline-video video, #accelerated-video video, #difference-video video, #frame-slider img {
  image-rendering: pixelated; }
#status { font-weight: 600; }
/* A phone: Run, Cancel and a refusal in a bar fixed at the bottom of the screen, reachable from anywhere in the
   form; the page ends above it, and what is scrolled into view stops above it. */
@media (max-width: 700px) {
  #run-bar { position: fixed; left: 0; right: 0; bottom: 0; z-index: 40; margin: 0; padding: 8px 10px;
    background: var(--background-fill-primary); border-top: 1px solid var(--border-color-primary);
    box-shadow: 0 -4px 12px rgba(0, 0, 0, 0.08); }
  #run-bar .refusal { max-height: 30vh; overflow-y: auto; }
  .gradio-container { padding-bottom: 110px !important; }
  #headline, #result-column, #refusal { scroll-margin-bottom: 120px; }
  .toast-wrap { bottom: 110px !important; }
}
/* charts sized to their container (the history chart): vega-embed sits in a flex row with no width of its own */
#history-chart .vega-embed { width: 100%; }
"""


# Run on page load (``launch(js=...)``). Gradio's slider moves a typed value into its range when its
# number box loses focus: Run would then run at a value the visitor did not choose, while the box
# still showed theirs. Stopped in the capture phase, the value typed stays what Run sends, and Run
# refuses it naming the field and its range (the API's own message).
PAGE_SCRIPT = """
() => {
  window.addEventListener('blur', (event) => {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || box.dataset.testid !== 'number-input' || box.value === '') return;
    const value = Number(box.value);
    if (value < Number(box.min) || value > Number(box.max)) event.stopPropagation();
  }, true);
}
"""
