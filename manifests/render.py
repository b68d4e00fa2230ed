"""What the three reports share: one plotting style, PNG bytes of a figure, and the HTML pieces.

The dataset card (``wit.ingest.card``), the evaluation report (``wit.evaluate.report``) and the run
report (``wit.pipeline.report``) draw on figures made by :func:`figure` with the colours below and
turn them into bytes with :func:`png`; the two HTML pages build their head, paragraphs, tables and
figures with the helpers here, on one style sheet (:data:`CSS`).

Figures use matplotlib's object API, not pyplot: no global state and no display, so a library can
draw them anywhere, and a figure gives the same PNG bytes wherever the same matplotlib and fonts
are installed. matplotlib is imported by :func:`figure`, not with this module.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100

# The palette (seaborn's "deep"): every plot of the three reports draws with these.
BLUE = "#4c72b0"  # the main series: bars, curves, a linear probe, "after"
ORANGE = "#dd8452"
GREEN = "#55a868"
RED = "#c44e52"  # what a score is read against: chance in a bar chart, zero-shot, a cap
GREY = "#8c8c8c"  # guides: the y = x diagonal, chance under a curve
LIGHT_GREY = "#c4c4c4"  # "before", drawn behind the main series
# several series in one plot (each shift, each evaluation during training), in this order
CYCLE = (BLUE, ORANGE, GREEN, RED, "#8172b3", "#937860", "#da8bc3", "#ccb974", "#64b5cd")

CSS = f"""
body{{font-family:system-ui,sans-serif;max-width:72em;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}}
h2{{border-bottom:2px solid {BLUE};padding-bottom:.2em;margin-top:2em}}
table{{border-collapse:collapse;margin:.6em 0;font-size:.9em}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}th{{background:#f0f3f8}}
img{{max-width:100%}}figure{{margin:1em 0}}figcaption{{font-size:.85em;color:#555}}
"""


def figure(width: float, height: float) -> Figure:
    """A figure of ``width`` by ``height`` inches at :data:`DPI`, on matplotlib's object API."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes, cropped to what it draws; no ``Software`` tag, so no version in the bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def num(value) -> str:
    """A number as the reports print it: an int with thousands separators, a float to 4 significant
    digits (whole from 1,000 up), anything else (``None``, a bool, text) as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def esc(text) -> str:
    """``str(text)`` escaped for HTML text and quoted attributes."""
    return html.escape(str(text), quote=True)


def inline_code(text: str) -> str:
    """A paragraph of the reports' Markdown as HTML: escaped, with `code` spans and **bold**."""
    parts = esc(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def data_uri(image: bytes) -> str:
    """PNG bytes as a ``data:`` URI, for an image inside a page that is one file."""
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def html_head(title: str, css: str = CSS) -> str:
    """A page's start up to and including ``<body>``: its escaped title and ``css`` inline."""
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width'><style>{css}</style></head><body>"
    )


def html_figure(image: bytes, caption: str, source_html: str = "") -> str:
    """A ``<figure>`` of PNG bytes inlined, captioned with ``caption`` and, in brackets after it,
    ``source_html`` (HTML already, a link to what the plot was drawn from)."""
    source = f" ({source_html})" if source_html else ""
    return (
        f"<figure><img alt='{esc(caption)}' src='{data_uri(image)}'>"
        f"<figcaption>{esc(caption)}{source}</figcaption></figure>"
    )


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A ``<table>``: ``headers`` as text (escaped here), ``rows`` of cells that are HTML already."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attr = f" class='{esc(cls)}'" if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
