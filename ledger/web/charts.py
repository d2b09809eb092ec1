"""Charts for the metrics page: evaluation means over the history, as inline SVG drawn on the
server by pygal (LGPL-3.0-or-later, a Python dependency: nothing of it is sent but the SVG).

pygal writes the SVG through an XML serialiser, so every text it holds (a label a user gave
`ledger eval`) comes out escaped. Its output would load a tooltip script from the network;
the chart is drawn with no script at all instead (`js=[]`, and the inline config script
removed), so the page loads nothing from anywhere and runs no JavaScript.
"""
from __future__ import annotations

from typing import Any, Iterable

# The metrics charted when the page is not asked for others: the headline scores, all in [0, 1].
DEFAULT_METRICS = ("reliability", "generalization", "locality", "portability")


def _drop_scripts(root: Any) -> Any:
    for parent in list(root.iter()):
        for child in list(parent):
            if isinstance(child.tag, str) and child.tag.rsplit("}", 1)[-1] == "script":
                parent.remove(child)
    return root


def means_chart(title: str, points: Iterable[tuple[int, dict[str, float]]], metrics: Iterable[str]) -> str:
    """An SVG line chart (markup to inline in a page): one line per metric, x the revision
    number, y the evaluation's mean of that metric. `points`: (revision number, means) in
    revision order."""
    import pygal
    from pygal.style import Style

    style = Style(background="white", plot_background="white", font_family="sans-serif",
                  colors=("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                          "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"))
    points = list(points)
    series = {m: [(rev, means[m]) for rev, means in points if isinstance(means.get(m), (int, float))]
              for m in metrics}
    series = {m: pts for m, pts in series.items() if pts}
    values = [y for pts in series.values() for _, y in pts]
    revs = sorted({rev for rev, _ in points})
    options: dict[str, Any] = {}
    if values and 0 <= min(values) and max(values) <= 1:
        options["range"] = (0, 1)          # scores: the whole scale, so a move reads as its size
    if len(revs) <= 16:
        options["x_labels"] = revs         # one label per evaluated revision
    chart = pygal.XY(js=[], style=style, width=900, height=340, title=title, x_title="revision",
                     show_dots=True, dots_size=3, disable_xml_declaration=True, truncate_legend=24,
                     truncate_label=12, x_value_formatter=lambda x: f"rev-{x:g}", value_formatter=lambda y: f"{y:.3f}",
                     explicit_size=False, **options)
    chart.add_xml_filter(_drop_scripts)
    for metric, pts in series.items():
        chart.add(metric, pts)
    return chart.render(is_unicode=True)
