"""One self-contained HTML file per report: text, tables, figures and images, readable offline.

Everything a report shows is embedded: figures and images become base64 PNG data URIs and the
stylesheet is inline, so the file can be mailed, archived or opened from a USB stick.

Typical use::

    report = HtmlReport("Data exploration")
    sec = report.section("Overview", "overview")
    sec.text("**26684** patients; see the table below.")
    sec.table(frame, "Counts")
    sec.figure(fig, "Class shares")
    report.write(out_dir / "report.html")

All text passed in is escaped with :func:`html.escape`; :meth:`Section.text` then applies a small
markdown-like subset (``**bold**``, ```code```, ``- `` bullet lists, blank-line paragraphs).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pandas.api import types as pd_types

from pneumodet.safeio import write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Grid", "HtmlReport", "Section", "encode_png", "figure_to_png"]

_ANCHOR = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+?)`")

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa; --accent: #0b5cad;
        --note-bg: #fff8e5; --note-line: #d4a72c; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.55; font-size: 16px;
       font-family: -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
.layout { display: grid; grid-template-columns: 230px minmax(0, 1fr); max-width: 1320px; margin: 0 auto; }
nav.toc { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto;
          padding: 28px 16px 28px 20px; border-right: 1px solid var(--line); font-size: 14px; }
nav.toc h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
             margin: 0 0 10px; }
nav.toc ol { margin: 0; padding-left: 18px; }
nav.toc li { margin: 4px 0; }
nav.toc a { color: var(--fg); text-decoration: none; }
nav.toc a:hover { color: var(--accent); text-decoration: underline; }
main { padding: 24px 40px 64px; min-width: 0; }
header.report-head { border-bottom: 1px solid var(--line); margin-bottom: 8px; padding-bottom: 10px; }
header.report-head h1 { margin: 0 0 4px; font-size: 30px; line-height: 1.25; }
header.report-head p { margin: 0; color: var(--muted); font-size: 14px; }
section.report-section { padding-top: 18px; margin-top: 14px; border-top: 1px solid var(--line); }
section.report-section:first-of-type { border-top: none; }
section.report-section > h2 { font-size: 23px; margin: 0 0 10px; }
h3 { font-size: 18px; margin: 22px 0 8px; }
p { margin: 8px 0; max-width: 80ch; }
ul { margin: 6px 0; padding-left: 22px; max-width: 80ch; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%;
       background: var(--bg-soft); padding: 1px 4px; border-radius: 4px; }
pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
      line-height: 1.4; background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px;
      padding: 12px 14px; overflow: auto; max-height: 640px; }
.note { background: var(--note-bg); border-left: 4px solid var(--note-line); padding: 8px 12px;
        border-radius: 4px; margin: 10px 0; max-width: 80ch; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line);
             border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 5px; white-space: pre-line; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; margin: 12px 0; }
table.data { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
.table-caption { color: var(--muted); font-size: 13.5px; padding-bottom: 6px; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 5px 12px; text-align: left;
                               vertical-align: top; }
table.data th, table.data .num { white-space: nowrap; }
table.data .num { text-align: right; }
table.data thead th { background: var(--bg-soft); border-bottom: 2px solid var(--line); }
table.data tbody tr:hover { background: #f0f6ff; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--cell, 260px), 1fr));
        gap: 14px; margin: 12px 0; }
.grid figure { margin: 0; }
@media (max-width: 860px) {
  .layout { grid-template-columns: 1fr; }
  nav.toc { position: static; max-height: none; border-right: none; border-bottom: 1px solid var(--line); }
  main { padding: 16px; }
}
"""


def _inline(text: str) -> str:
    """Escape ``text`` and render ``**bold**`` and ```code``` inside it."""
    out = html.escape(text)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _markdownish(text: str) -> str:
    """Blank-line separated paragraphs; a block whose lines all start with ``- `` is a bullet list."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]
    parts = []
    for block in blocks:
        lines = block.splitlines()
        if all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            parts.append(f"<ul>{items}</ul>")
        else:
            parts.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(parts)


def encode_png(image: bytes | np.ndarray) -> bytes:
    """PNG bytes of ``image``: PNG bytes pass through; an array is encoded.

    Arrays are ``uint8`` of shape ``[H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA).
    """
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError("image bytes are not a PNG file (bad signature)")
        return data
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")


def figure_to_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes, then close it so it frees its memory."""
    return _render_figure(fig, dpi)[0]


def _render_figure(fig: Figure, dpi: int) -> tuple[bytes, float]:
    """PNG bytes of ``fig`` and the height in image pixels of its smallest drawn text (0 without text); the
    figure is closed afterwards."""
    from matplotlib.text import Text

    buf = io.BytesIO()
    # a figure with a layout engine already fits its canvas; "tight" would draw it a second time
    tight = "tight" if fig.get_layout_engine() is None else None
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=tight, facecolor="white")
    # measured after drawing: tick labels get their text only when the figure is drawn
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    if fig.canvas.manager is not None:  # only pyplot-managed figures are registered for closing
        import matplotlib.pyplot as plt

        plt.close(fig)
    return buf.getvalue(), min(sizes, default=0.0) * dpi / 72.0


def _cell(value: object, float_format: str) -> str:
    if value is None or (not isinstance(value, str) and pd.api.types.is_scalar(value) and pd.isna(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return float_format.format(float(value))
    return html.escape(str(value))


def _table_html(frame: pd.DataFrame, float_format: str) -> str:
    numeric = [pd_types.is_numeric_dtype(frame[c]) and not pd_types.is_bool_dtype(frame[c]) for c in frame.columns]
    attr = [' class="num"' if n else "" for n in numeric]
    head = "".join(f"<th{a}>{html.escape(str(c))}</th>" for c, a in zip(frame.columns, attr, strict=True))
    rows = []
    for values in frame.itertuples(index=False, name=None):
        cells = "".join(f"<td{a}>{_cell(v, float_format)}</td>" for v, a in zip(values, attr, strict=True))
        rows.append(f"<tr>{cells}</tr>")
    return (f'<table class="data"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
            + "\n</tbody></table>")


def _png_tag(png: bytes, alt: str, text_px: float | None = None) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    # a chart says how tall its smallest text is in its own pixels, so that a check in the browser can tell
    # how tall that text is on screen at the size the page shows the picture
    data = f' data-min-text-px="{text_px:.1f}"' if text_px else ""
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}"{data}>'


def _figure_block(png: bytes, text_px: float | None = None, *, caption: str | None) -> str:
    cap = f"<figcaption>{_inline(caption)}</figcaption>" if caption else ""
    return f"<figure>{_png_tag(png, caption or '', text_px)}{cap}</figure>"


class _Blocks:
    """What sections and grids share: an ordered list of HTML blocks holding pictures."""

    def __init__(self) -> None:
        self._blocks: list[str | _Blocks] = []

    def figure(self, fig: Figure, caption: str | None = None, *, dpi: int = 110) -> None:
        """Embed a matplotlib figure as a PNG (the figure is closed afterwards); the ``<img>`` carries the
        pixel height of the figure's smallest text as ``data-min-text-px``."""
        self._blocks.append(_figure_block(*_render_figure(fig, dpi), caption=caption))

    def image(self, image: bytes | np.ndarray, caption: str | None = None) -> None:
        """Embed PNG bytes or a ``uint8`` array ``[H, W]`` / ``[H, W, 3]``."""
        self._blocks.append(_figure_block(encode_png(image), caption=caption))

    def render(self) -> str:
        return "\n".join(b if isinstance(b, str) else b.render() for b in self._blocks)


class Grid(_Blocks):
    """A responsive grid of pictures: as many columns of at least ``min_width`` px as fit."""

    def __init__(self, min_width: int = 260) -> None:
        super().__init__()
        self.min_width = int(min_width)

    def render(self) -> str:
        return f'<div class="grid" style="--cell: {self.min_width}px">\n{super().render()}\n</div>'


class Section(_Blocks):
    """One titled part of a report, listed in the table of contents under its ``anchor_id``."""

    def __init__(self, title: str, anchor_id: str) -> None:
        super().__init__()
        self.title = title
        self.anchor_id = anchor_id

    def text(self, text: str) -> None:
        """Paragraphs (blank-line separated), ``- `` bullet lists, ``**bold**`` and ```code```."""
        self._blocks.append(_markdownish(text))

    def heading(self, text: str) -> None:
        """A sub-heading inside the section."""
        self._blocks.append(f"<h3>{html.escape(text)}</h3>")

    def note(self, text: str) -> None:
        """A highlighted remark, e.g. "no images present: this section is empty"."""
        self._blocks.append(f'<div class="note">{_inline(text)}</div>')

    def pre(self, text: str) -> None:
        """Preformatted text (a DICOM header, a log), shown verbatim in a scrolling box."""
        self._blocks.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, frame: pd.DataFrame, caption: str | None = None, *, index: bool = False,
              max_rows: int = 60, float_format: str = "{:,.2f}") -> None:
        """A pandas table; longer tables show their first ``max_rows`` rows and say so.

        Integers get thousands separators, floats ``float_format``, missing values a dash; numeric
        columns are right-aligned, text columns left-aligned.
        """
        shown = (frame.reset_index() if index else frame).head(max_rows)
        cap = f'<div class="table-caption">{_inline(caption)}</div>' if caption else ""
        self._blocks.append(f'<div class="table-wrap">{cap}{_table_html(shown, float_format)}</div>')
        if len(frame) > max_rows:
            self.note(f"Showing the first {max_rows} of {len(frame):,} rows.")

    def grid(self, min_width: int = 260) -> Grid:
        """Start a picture grid at this point of the section; fill it with ``image``/``figure``."""
        grid = Grid(min_width)
        self._blocks.append(grid)  # rendered when the report is, so it may be filled later
        return grid

    def render(self) -> str:
        inner = super().render()
        return (f'<section class="report-section" id="{self.anchor_id}">\n'
                f"<h2>{html.escape(self.title)}</h2>\n{inner}\n</section>")


class HtmlReport:
    """A single-file HTML report: a title, a table of contents and its sections in order."""

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self._sections: list[Section] = []

    @property
    def sections(self) -> tuple[Section, ...]:
        return tuple(self._sections)

    def section(self, title: str, anchor_id: str) -> Section:
        """Append a section; ``anchor_id`` must be unique and a valid HTML id (letters, digits, -, _)."""
        if not _ANCHOR.match(anchor_id):
            raise ValueError(f"anchor id {anchor_id!r} must start with a letter and hold only "
                             "letters, digits, '-' and '_'")
        if any(s.anchor_id == anchor_id for s in self._sections):
            raise ValueError(f"anchor id {anchor_id!r} is already used by another section")
        sec = Section(title, anchor_id)
        self._sections.append(sec)
        return sec

    def _toc(self) -> str:
        items = "".join(f'<li><a href="#{s.anchor_id}">{html.escape(s.title)}</a></li>'
                        for s in self._sections)
        return f'<nav class="toc"><h2>Contents</h2><ol>{items}</ol></nav>'

    def render(self, *, generated: _dt.datetime | None = None) -> str:
        """The whole document as a string."""
        when = (generated or _dt.datetime.now().astimezone()).strftime("%Y-%m-%d %H:%M %Z").strip()
        sub = f"{html.escape(self.subtitle)} · " if self.subtitle else ""
        sections = "\n".join(s.render() for s in self._sections)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f'<div class="layout">\n{self._toc()}\n<main>\n'
            f'<header class="report-head"><h1>{html.escape(self.title)}</h1>'
            f"<p>{sub}generated {html.escape(when)} by pneumodet</p></header>\n"
            f"{sections}\n</main>\n</div>\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically (:func:`pneumodet.safeio.write_text`): a full disk leaves the
        previous report as it was, and the ``OSError`` names the report."""
        path = Path(path)
        try:
            return write_text(path, self.render())
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the report ({exc.strerror or exc}); a previous one is "
                          "kept", str(path)) from exc

