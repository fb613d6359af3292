"""One look for imgflow's HTML reports: a single stylesheet and small helpers that build markup.

The validation report, the label-quality audit and the gate report are self-contained pages (no
script, no network: plots inlined as base64) that people open from a folder or an MLflow artifact.
They share :data:`STYLESHEET` and these helpers, so a table, a verdict or a figure looks the same
in each::

    from components.core import report as kit

    kit.page(
        "imgflow gate report: PASSED",
        heading="Gate report",
        top=[kit.verdict_banner("PASSED: 12 gates", "pass")],
        sections=[kit.section("Gates", kit.table(["gate", "value"], [["min_accuracy", "0.9312"]]))],
    )

Helpers return :class:`Html` (markup that is already safe); every other value put into a page goes
through :func:`esc`. The kit knows nothing about tasks, gates or manifests: the renderers of each
stage say what goes on the page, the kit only how it looks. Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Pages are read on laptops and in MLflow's artifact viewer (an iframe of ~1000 px): the table of
# contents moves to a sticky right column on wide screens and disappears on narrow ones; wide
# tables scroll inside their box instead of widening the page.
STYLESHEET = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d0d7de;--head:#f6f8fa;--pass:#1a7f37;--fail:#cf222e;
--warn:#9a6700;--na:#6e7781;--info:#0969da}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
.page{display:grid;grid-template-columns:minmax(0,1fr) 13rem;column-gap:2.5rem;max-width:1280px;
margin:0 auto;padding:1.2rem 1.5rem 3rem}
.page>header,.page>main{grid-column:1}
.page>nav{grid-column:2;grid-row:1/span 2;align-self:start;position:sticky;top:1rem;margin-top:.6rem;
padding-left:.9rem;border-left:2px solid var(--line);font-size:.88em}
.page>nav b{display:block;margin-bottom:.3rem;color:var(--muted);font-weight:600}
.page>nav a{display:block;padding:.12rem 0;color:var(--muted);text-decoration:none}
.page>nav a:hover{color:var(--info)}
@media (max-width:960px){.page{grid-template-columns:minmax(0,1fr)}.page>nav{display:none}}
h1{margin:.3rem 0 .8rem;font-size:1.65rem}
h2{margin:2.2rem 0 .6rem;padding-bottom:.25rem;border-bottom:1px solid var(--line);font-size:1.3rem}
h3{margin:1.4rem 0 .4rem;font-size:1.05rem}
main>section:first-child>h2{margin-top:1.2rem}
p{margin:.5rem 0}
.verdict{margin:.6rem 0 1rem;padding:.8rem 1.1rem;border-radius:6px;color:#fff;background:var(--na);
font-size:1.25rem;font-weight:600}
.verdict.pass{background:var(--pass)}.verdict.fail{background:var(--fail)}.verdict.warn{background:#bf5a00}
.verdict.insufficient{background:var(--info)}
.scroll{max-width:100%;overflow-x:auto}
table{margin:.5rem 0 1.2rem;border-collapse:collapse;font-size:.9em}
th,td{padding:.3rem .6rem;border:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.fail>td{background:#ffebe9}tr.warn>td{background:#fff8c5}
table.compact{margin:0;font-size:.85em}table.compact td,table.compact th{padding:.1rem .4rem}
table.compact td{overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 .55rem;border:1px solid currentColor;border-radius:999px;
font-size:.85em;font-weight:600;white-space:nowrap}
.badge.pass{color:var(--pass);background:#dafbe1}.badge.fail{color:var(--fail);background:#ffebe9}
.badge.warn{color:var(--warn);background:#fff8c5}.badge.na{color:var(--na);background:var(--head)}
.badge.insufficient{color:var(--info);background:#ddf4ff}
dl.kv{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.2rem 1.2rem;margin:.5rem 0 1rem}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0;overflow-wrap:anywhere}
figure{margin:.8rem 0 1.6rem}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,26rem),1fr));gap:1rem;align-items:start}
.figures figure{margin:.8rem 0}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{margin-top:.3rem;color:var(--muted);font-size:.88em}
.note{color:var(--muted)}
code{padding:0 .25em;border-radius:3px;background:var(--head);font:.88em ui-monospace,Menlo,Consolas,monospace}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem;margin:.5rem 0 1.2rem}
.card{width:9.5rem;padding:.5rem;border:1px solid var(--line);border-radius:6px;font-size:.82em}
.card.wide{width:auto}.card img{width:64px;height:64px;image-rendering:pixelated}
.bar{display:inline-block;height:.8em;border-radius:2px;background:var(--info)}
"""
STYLESHEET_SHA256 = hashlib.sha256(STYLESHEET.encode("utf-8")).hexdigest()
"""Every page names it in ``<meta name="generator">``: which version of the look it was drawn with."""

VERDICT_KINDS = ("pass", "fail", "warn", "na", "insufficient")
"""Badge and banner colours: passed, failed, warning only, not applicable, insufficient data."""

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
# A cell that reads as a number (1, -0.25, 3e-05, 93.1%, nan) or a bound (">= 0.9000") is right-aligned;
# a class called "Infinity" or "1st" is not.
_NUMBER = re.compile(r"([<>]=?|==?)?\s*([+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?%?|nan)", re.IGNORECASE)


class Html(str):
    """Markup that is already safe to put into a page (what the helpers return)."""


@dataclass(frozen=True)
class Section:
    """One ``<h2>`` part of a page and its entry in the table of contents."""

    title: str
    body: Html


def esc(value: object) -> Html:
    """``value`` as text in a page: escaped, unless it is already :class:`Html`; None -> empty."""
    if isinstance(value, Html):
        return value
    return Html("" if value is None else html.escape(str(value)))


def join(parts: Iterable[object]) -> Html:
    """Parts side by side, each escaped unless it is :class:`Html` (None and "" leave no trace)."""
    return Html("".join(esc(p) for p in parts))


def num(value: float | None, digits: int = 4) -> str:
    """A number for a table cell with ``digits`` decimals; None (not measured) -> empty."""
    return "" if value is None else f"{float(value):.{digits}f}"


def is_numeric(value: object) -> bool:
    """Whether a cell reads as a number (and is right-aligned with tabular digits)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and not isinstance(value, Html) and bool(_NUMBER.fullmatch(value.strip()))


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    row_classes: Sequence[str | None] | None = None,
    compact: bool = False,
) -> Html:
    """A table: one ``<th>`` per header, numbers right-aligned, everything else escaped.

    rows: cells in header order (:class:`Html` cells are kept as markup). row_classes: one CSS
    class per row, e.g. ``fail`` / ``warn`` to tint failed rows (None: no class). compact: the
    small variant for a table inside a table cell.
    """
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes is not None else None
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if is_numeric(c) else f"<td>{esc(c)}</td>" for c in row
        )
        body.append(f'<tr class="{esc(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    opening = '<table class="compact">' if compact else "<table>"
    markup = f"{opening}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return Html(f'<div class="scroll">{markup}</div>')


def _kind(kind: str) -> str:
    if kind not in VERDICT_KINDS:
        raise ValueError(f"unknown verdict kind {kind!r}: expected one of {', '.join(VERDICT_KINDS)}")
    return kind


def badge(text: object, kind: str) -> Html:
    """A small coloured label for a status in a table or a sentence (kind: :data:`VERDICT_KINDS`)."""
    return Html(f'<span class="badge {_kind(kind)}">{esc(text)}</span>')


def verdict_banner(text: object, kind: str) -> Html:
    """The page's decision as a coloured banner, ``id="verdict"`` (what ``scripts/check_report.py``
    looks for in the first screen)."""
    return Html(f'<div id="verdict" class="verdict {_kind(kind)}">{esc(text)}</div>')


def note(text: object) -> Html:
    """A muted paragraph: what is missing or not applicable, and why."""
    return Html(f'<p class="note">{esc(text)}</p>')


def paragraph(text: object) -> Html:
    return Html(f"<p>{esc(text)}</p>")


def subheading(text: object) -> Html:
    """An ``<h3>`` inside a section (not listed in the table of contents)."""
    return Html(f"<h3>{esc(text)}</h3>")


def code(text: object) -> Html:
    return Html(f"<code>{esc(text)}</code>")


def key_values(items: Mapping[str, object] | Iterable[tuple[str, object]]) -> Html:
    """Context as a two-column list: name, value (e.g. model, data version, git commit)."""
    pairs = items.items() if isinstance(items, Mapping) else items
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs)
    return Html(f'<dl class="kv">{rows}</dl>') if rows else Html("")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...``: an image inlined into the page, so the file stands alone."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(image: Path | str | None, *, alt: str, caption: str | None = None, embed: bool = True) -> Html:
    """An image with its alt text and an optional caption.

    embed: read the file ``image`` and inline it (base64; a missing file or None gives nothing, so
    a plot that was not drawn leaves no broken picture); otherwise ``image`` is a link relative to
    the page (e.g. ``"confusion_matrix.png"`` beside ``report.html``).
    """
    if image is None:
        return Html("")
    if embed:
        path = Path(image)
        if not path.is_file():
            return Html("")
        src = data_uri(path.read_bytes(), _MIME.get(path.suffix.lower(), "application/octet-stream"))
    else:
        src = Path(image).as_posix() if isinstance(image, Path) else str(image)
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return Html(f'<figure><img alt="{esc(alt)}" src="{esc(src)}">{cap}</figure>')


def figures(*items: Html) -> Html:
    """Figures side by side (two to a row on a wide screen, stacked on a narrow one)."""
    shown = [f for f in items if f]
    if len(shown) < 2:
        return join(shown)
    return Html('<div class="figures">' + "".join(shown) + "</div>")


def bar(value: float, top: float, *, width_px: int = 200) -> Html:
    """A horizontal bar ``value / top`` of ``width_px`` long (class balance and the like)."""
    share = value / top if top else 0.0
    return Html(f'<span class="bar" style="width:{width_px * share:.0f}px"></span>')


def gallery(cards: Iterable[object], *, wide: bool = False) -> Html:
    """Cards (thumbnails with a few lines each) that wrap across the width of the page."""
    cls = "card wide" if wide else "card"
    return Html(
        '<div class="gallery">' + "".join(f'<div class="{cls}">{esc(c)}</div>' for c in cards) + "</div>"
    )


def section(title: str, *parts: object) -> Section:
    """An ``<h2>title</h2>`` part of the page made of ``parts`` (Html kept, text escaped)."""
    return Section(title, join(parts))


def page(
    title: str,
    *,
    heading: str,
    top: Iterable[object] = (),
    sections: Iterable[Section | None] = (),
) -> str:
    """A whole self-contained page: ``heading`` and ``top`` (verdict, summary) first, then the
    sections in order; None sections (nothing measured) are left out. A table of contents lists
    the sections; it sits after them in the document (first come the verdict and the evidence
    when read as text or by a screen reader) and is shown beside them on wide screens.
    """
    parts = [s for s in sections if s is not None]
    anchors = _anchors([s.title for s in parts])
    body = "".join(
        f'<section id="{a}"><h2>{esc(s.title)}</h2>{s.body}</section>'
        for a, s in zip(anchors, parts, strict=True)
    )
    toc = "".join(f'<a href="#{a}">{esc(s.title)}</a>' for a, s in zip(anchors, parts, strict=True))
    nav = f'<nav aria-label="sections"><b>On this page</b>{toc}</nav>' if len(parts) > 1 else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="imgflow report kit, stylesheet sha256 {STYLESHEET_SHA256}">'
        f"<title>{esc(title)}</title><style>{STYLESHEET}</style></head>"
        f'<body><div class="page"><header><h1>{esc(heading)}</h1>{join(top)}</header>'
        f"<main>{body}</main>{nav}</div></body></html>\n"
    )


def _anchors(titles: Sequence[str]) -> list[str]:
    """A unique ``id`` for each section title (``Test metrics (multi-label)`` -> ``test-metrics-multi-label``)."""
    seen: dict[str, int] = {}
    out = []
    for title in titles:
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        seen[slug] = seen.get(slug, 0) + 1
        out.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return out
