"""The report kit (components.core.report): escaping, numeric alignment, badges, figures, one stylesheet."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from components.core import report as kit


def test_text_is_escaped_and_markup_is_kept() -> None:
    assert kit.esc('<b>"Bag" & co</b>') == "&lt;b&gt;&quot;Bag&quot; &amp; co&lt;/b&gt;"
    assert kit.esc(kit.Html("<b>ok</b>")) == "<b>ok</b>"
    assert kit.esc(None) == "" and kit.esc(3) == "3"
    assert kit.join(["a<", kit.Html("<br>"), None, 2]) == "a&lt;<br>2"


def test_num_formats_and_leaves_missing_values_empty() -> None:
    assert kit.num(0.123456) == "0.1235" and kit.num(2, 1) == "2.0" and kit.num(None) == ""


@pytest.mark.parametrize(
    "cell", [3, 0.25, "0.9400", "-0.0650", "3e-05", "93.1%", "nan", ">= 0.9900", "<= 0.03"]
)
def test_numbers_and_bounds_are_right_aligned(cell: object) -> None:
    assert kit.is_numeric(cell)
    assert f'<td class="num">{kit.esc(cell)}</td>' in kit.table(["x"], [[cell]])


@pytest.mark.parametrize("cell", ["Infinity", "1st", "T-shirt/top", "", True, None, kit.Html("<b>1</b>")])
def test_words_are_left_aligned(cell: object) -> None:
    assert not kit.is_numeric(cell)
    assert '<td class="num">' not in kit.table(["x"], [[cell]])


def test_table_escapes_headers_and_cells_and_tints_rows() -> None:
    html = kit.table(
        ["<th>", "value"],
        [["<b>Handbag</b>", "1"], [kit.badge("FAIL", "fail"), "2"]],
        row_classes=[None, "fail"],
    )
    assert "<th>&lt;th&gt;</th><th>value</th>" in html
    assert "&lt;b&gt;Handbag&lt;/b&gt;" in html and "<b>Handbag</b>" not in html
    assert "<tr><td>&lt;b&gt;" in html  # no class on the untinted row
    assert '<tr class="fail"><td><span class="badge fail">FAIL</span></td><td class="num">2</td></tr>' in html
    assert kit.table(["k"], [["v"]], compact=True).count('<table class="compact">') == 1


def test_badges_and_the_verdict_banner_take_only_known_kinds() -> None:
    for kind in kit.VERDICT_KINDS:
        assert kit.badge("x", kind) == f'<span class="badge {kind}">x</span>'
        assert f".badge.{kind}{{" in kit.STYLESHEET  # every kind has its colour
    banner = kit.verdict_banner("FAILED: 2 <gates>", "fail")
    assert banner == '<div id="verdict" class="verdict fail">FAILED: 2 &lt;gates&gt;</div>'
    with pytest.raises(ValueError, match="unknown verdict kind"):
        kit.badge("x", "FAIL")


def _png(path: Path, size: tuple[int, int] = (3, 2)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path, format="PNG")
    return path


def test_figure_embeds_a_real_png_with_alt_text_and_caption(tmp_path: Path) -> None:
    png = _png(tmp_path / "plot.png")
    html = kit.figure(png, alt='ROC "curves"', caption="Up & left is better")
    src = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert src is not None
    data = base64.b64decode(src.group(1))
    assert data == png.read_bytes() and Image.open(io.BytesIO(data)).size == (3, 2)
    assert (
        'alt="ROC &quot;curves&quot;"' in html and "<figcaption>Up &amp; left is better</figcaption>" in html
    )


def test_figure_links_relative_files_and_skips_missing_ones(tmp_path: Path) -> None:
    html = kit.figure("confusion matrix.png", alt="cm", embed=False)
    assert html == '<figure><img alt="cm" src="confusion matrix.png"></figure>'
    assert kit.figure(tmp_path / "never-drawn.png", alt="x") == "" and kit.figure(None, alt="x") == ""


def test_figures_sit_side_by_side_only_when_there_are_two(tmp_path: Path) -> None:
    one = kit.figure(_png(tmp_path / "a.png"), alt="a")
    assert kit.figures(one, kit.figure(None, alt="b")) == one
    assert kit.figures(one, one).startswith('<div class="figures"><figure>')


def test_key_values_notes_bars_and_galleries() -> None:
    assert kit.key_values({"model": "<m>", "data version": 3}) == (
        '<dl class="kv"><dt>model</dt><dd>&lt;m&gt;</dd><dt>data version</dt><dd>3</dd></dl>'
    )
    assert kit.key_values({}) == ""
    assert kit.note("no <baseline>") == '<p class="note">no &lt;baseline&gt;</p>'
    assert 'style="width:100px"' in kit.bar(5, 10) and 'style="width:0px"' in kit.bar(1, 0)
    cards = kit.gallery(["a<", kit.Html("<br>")], wide=True)
    assert (
        cards
        == '<div class="gallery"><div class="card wide">a&lt;</div><div class="card wide"><br></div></div>'
    )


def test_page_has_one_stylesheet_sections_in_order_and_a_contents_list_after_them() -> None:
    page = kit.page(
        "Report: <FAILED>",
        heading="Gate report",
        top=[kit.verdict_banner("FAILED", "fail")],
        sections=[kit.section("Gates", kit.paragraph("g")), None, kit.section("Test metrics (multi-label)", "m"),
                  kit.section("Gates", "again")],
    )  # fmt: skip
    assert re.findall(r"<style>(.*?)</style>", page, flags=re.S) == [kit.STYLESHEET]
    assert (
        page.count("<style") == 1 and "<script" not in page and "http" not in page.replace("http-equiv", "")
    )
    assert f"stylesheet sha256 {kit.STYLESHEET_SHA256}" in page
    assert "<title>Report: &lt;FAILED&gt;</title>" in page
    ids = re.findall(r'<section id="([^"]+)"><h2>', page)
    assert ids == ["gates", "test-metrics-multi-label", "gates-2"]
    # verdict first, then the sections, then the table of contents (tests find each h2 before its link)
    assert (
        page.index('id="verdict"')
        < page.index("<h2>Gates</h2>")
        < page.index("<nav")
        < page.index('href="#gates-2"')
    )
    assert page.endswith("</html>\n")


def test_a_page_with_one_section_has_no_contents_list() -> None:
    page = kit.page("t", heading="h", sections=[kit.section("Only", "x")])
    assert "<nav" not in page and '<section id="only"><h2>Only</h2>x</section>' in page
