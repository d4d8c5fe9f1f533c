"""Reports people read: tables in the terminal (rich), report.md, and a self-contained report.html.

A report is a title and a list of `Section`s; a section holds markdown-able `Table`s, `Figure`s (PNG
files) and image `Grid`s. `write_report` writes both files; the HTML inlines its CSS and every image
as a base64 data URI, so it can be mailed or attached as one file. Any stage can build sections (eval
writes metrics, GSB and Table 3; the demo adds reward curves and accuracy plots).

    sections = [Section("Metrics", tables=[Table("Table 2", ["Policy", "PickScore"], [["base", 21.3]])],
                        figures=[Figure(out / "gsb.png", "Good/Same/Bad")])]
    write_report(out, "onereward eval", sections)
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .artifacts import write_bytes, write_text

MISSING = "–"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]
    caption: str = ""
    # Optional header row above the columns: (label, number of columns it spans); spans sum to len(columns).
    groups: list[tuple[str, int]] | None = None
    digits: int = 4


@dataclass
class Figure:
    path: Path
    caption: str = ""


@dataclass
class Grid:
    """Rows of images under shared column headers (e.g. source | mask | policy A | policy B)."""
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Path | None]]]
    caption: str = ""
    thumb_px: int = 160


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------
def format_cell(v, digits: int = 4) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return MISSING
        return f"{v:.{digits}f}"
    return str(v)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def table_markdown(t: Table) -> str:
    cols = list(t.columns)
    if t.groups:
        # Markdown has no spanning headers: prefix each column with its group.
        labels = [g for g, n in t.groups for _ in range(n)]
        cols = [f"{g} · {c}" if g else c for g, c in zip(labels, cols)]
    lines = [f"**{_md_escape(t.title)}**", ""] if t.title else []
    lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in t.rows:
        lines.append("| " + " | ".join(_md_escape(format_cell(v, t.digits)) for v in r) + " |")
    if t.caption:
        lines += ["", f"*{_md_escape(t.caption)}*"]
    return "\n".join(lines)


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def section_markdown(s: Section, base: Path, level: int = 2) -> str:
    out = [f"{'#' * level} {s.title}", ""]
    if s.text:
        out += [s.text.strip(), ""]
    for n in s.notes:
        out.append(f"- {n}")
    if s.notes:
        out.append("")
    for t in s.tables:
        out += [table_markdown(t), ""]
    for f in s.figures:
        out += [f"![{_md_escape(f.caption or Path(f.path).stem)}]({_rel(f.path, base)})", ""]
        if f.caption:
            out += [f"*{f.caption}*", ""]
    for g in s.grids:
        out += [f"**{g.title}**", "", "| " + " | ".join([""] + g.columns) + " |",
                "|" + "|".join("---" for _ in range(len(g.columns) + 1)) + "|"]
        for label, paths in g.rows:
            cells = [f"![]({_rel(p, base)})" if p else MISSING for p in paths]
            out.append("| " + " | ".join([_md_escape(label)] + cells) + " |")
        out += ["", f"*{g.caption}*", ""] if g.caption else [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------
CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem} h3{font-size:1.05rem;margin-top:1.4rem}
.sub{color:#666;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}
th,td{border:1px solid #d0d0d0;padding:.3rem .55rem;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
caption{caption-side:bottom;color:#555;font-size:.82rem;padding-top:.3rem;text-align:left}
.tt{font-weight:600;margin-top:1rem} .scroll{overflow-x:auto}
figure{margin:1rem 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.85rem}
.grid td{text-align:center;vertical-align:middle} .grid img{image-rendering:pixelated;display:block;margin:auto}
code{background:#f4f4f4;padding:0 .25rem;border-radius:3px}
ul.notes{color:#444;font-size:.9rem}
"""


def _data_uri(path: Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".webp": "image/webp"}.get(p.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def _inline(text: str) -> str:
    """Escape, then allow `code` and **bold**, the only markdown our sections use inline."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def table_html(t: Table) -> str:
    out = [f'<div class="tt">{_inline(t.title)}</div>' if t.title else "", '<div class="scroll"><table>']
    if t.caption:
        out.append(f"<caption>{_inline(t.caption)}</caption>")
    if t.groups:
        out.append("<tr>" + "".join(f'<th colspan="{n}">{_inline(g)}</th>' for g, n in t.groups) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in t.columns) + "</tr>")
    for r in t.rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(format_cell(v, t.digits))}</td>" for v in r) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def grid_html(g: Grid) -> str:
    out = [f'<h3>{_inline(g.title)}</h3>', '<div class="scroll"><table class="grid">',
           "<tr><th></th>" + "".join(f"<th>{_inline(c)}</th>" for c in g.columns) + "</tr>"]
    for label, paths in g.rows:
        cells = []
        for p in paths:
            uri = _data_uri(p) if p else None
            cells.append(f'<td><img src="{uri}" width="{g.thumb_px}" alt=""></td>' if uri else f"<td>{MISSING}</td>")
        out.append(f"<tr><th>{_inline(label)}</th>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    if g.caption:
        out.append(f'<div class="sub">{_inline(g.caption)}</div>')
    return "\n".join(out)


def section_html(s: Section) -> str:
    out = [f"<h2>{_inline(s.title)}</h2>"]
    for para in [p for p in re.split(r"\n\s*\n", s.text.strip()) if p.strip()] if s.text else []:
        out.append(f"<p>{_inline(para)}</p>")
    if s.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in s.notes) + "</ul>")
    out += [table_html(t) for t in s.tables]
    for f in s.figures:
        uri = _data_uri(f.path)
        if uri:
            out.append(f'<figure><img src="{uri}" alt="{html.escape(f.caption)}">'
                       f"<figcaption>{_inline(f.caption)}</figcaption></figure>")
    out += [grid_html(g) for g in s.grids]
    return "\n".join(out)


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    body = "\n".join(section_html(s) for s in sections)
    sub = f'<div class="sub">{_inline(subtitle)}</div>' if subtitle else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>{sub}\n{body}\n</body></html>\n")


def render_markdown(title: str, sections: Sequence[Section], base: Path, subtitle: str = "") -> str:
    parts = [f"# {title}", ""] + ([subtitle, ""] if subtitle else [])
    parts += [section_markdown(s, base) for s in sections]
    return "\n".join(parts).rstrip() + "\n"


def write_report(out_dir, title: str, sections: Sequence[Section], *, subtitle: str | None = None,
                 name: str = "report") -> tuple[Path, Path]:
    """Write `<name>.md` (images linked relative to out_dir) and a self-contained `<name>.html`."""
    out_dir = Path(out_dir)
    subtitle = subtitle if subtitle is not None else f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    md, page = out_dir / f"{name}.md", out_dir / f"{name}.html"
    write_text(md, render_markdown(title, sections, out_dir, subtitle))
    write_text(page, render_html(title, sections, subtitle))
    return md, page


# ----------------------------------------------------------------------------------------------
# Terminal and figures
# ----------------------------------------------------------------------------------------------
def rich_table(t: Table):
    from rich.table import Table as RichTable

    rt = RichTable(title=t.title, caption=t.caption or None, show_lines=False)
    cols = t.columns
    if t.groups:
        labels = [g for g, n in t.groups for _ in range(n)]
        cols = [f"{g}\n{c}" if g else c for g, c in zip(labels, cols)]
    for i, c in enumerate(cols):
        rt.add_column(c, justify="left" if i == 0 else "right")
    for r in t.rows:
        rt.add_row(*[format_cell(v, t.digits) for v in r])
    return rt


def print_tables(tables: Sequence[Table], console=None):
    from rich.console import Console

    console = console or Console(stderr=True)
    for t in tables:
        console.print(rich_table(t))


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
