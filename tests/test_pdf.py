"""PDFs read as page images: page limits, encrypted, corrupt and oversized documents."""

from __future__ import annotations

import pytest

from bot.media_urls import MediaHosts
from bot.pdf import PdfProblem, is_pdf, render_pdf
from tests.pdfs import encrypted_pdf, pdf_of_pages

LIMITS = {"max_pixels": 40_000_000, "max_long_side": 5376, "max_short_side": 1344}


def test_pages_are_rendered_as_large_as_the_model_can_use() -> None:
    rendered = render_pdf(pdf_of_pages(3), "doc.pdf", max_pages=4, **LIMITS)
    assert rendered.total_pages == 3
    assert [page.size for page in rendered.pages] == [(1344, 1740)] * 3  # letter: 1344 px wide
    assert all(page.mode == "RGB" for page in rendered.pages)
    assert rendered.pages[0].getpixel((5, 5)) == (255, 255, 255)


def test_only_the_first_pages_are_rendered() -> None:
    rendered = render_pdf(pdf_of_pages(10, (200, 100)), "long.pdf", max_pages=4, **LIMITS)
    assert (len(rendered.pages), rendered.total_pages) == (4, 10)
    assert rendered.pages[0].size == (2688, 1344)  # landscape: the shorter side is the limit


def test_encrypted_corrupt_and_oversized_pdfs_are_refused_clearly() -> None:
    with pytest.raises(PdfProblem) as refused:
        render_pdf(encrypted_pdf(), "secret.pdf", max_pages=4, **LIMITS)
    assert str(refused.value) == (
        "`secret.pdf` is a password-protected PDF, which I can't open. Send it without the password."
    )
    with pytest.raises(PdfProblem) as refused:
        render_pdf(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\n", "cut.pdf", max_pages=4, **LIMITS)
    assert str(refused.value) == "I could not read `cut.pdf` as a PDF."
    with pytest.raises(PdfProblem) as refused:  # 200 x 200 inches: 207 megapixels at 72 dpi
        render_pdf(pdf_of_pages(1, (14400, 14400)), "poster.pdf", max_pages=4, **LIMITS)
    assert str(refused.value) == (
        "Page 1 of `poster.pdf` is too large (207 megapixels at 72 dpi): the limit is 40 megapixels."
    )


def test_pdfs_are_recognised_by_their_bytes() -> None:
    assert is_pdf(pdf_of_pages(1)) and is_pdf(b"junk before %PDF-1.4\n")
    assert not is_pdf(b"\x89PNG\r\n\x1a\n") and not is_pdf(b"PDF-1.4")


def test_media_hosts_are_discords_and_the_configured_apis() -> None:
    hosts = MediaHosts("http://127.0.0.1:8080/api/v10")
    assert hosts.allows("https://media.discordapp.net/attachments/1/2/a.png")
    assert hosts.allows("https://images-ext-1.discordapp.net/external/x/https/example.com/a.png")
    assert hosts.allows("http://127.0.0.1:8080/external/x.png")
    assert not hosts.allows("http://127.0.0.1:8081/x.png")  # another port is another host
    assert not hosts.allows("https://example.com/a.png")
    assert not hosts.allows("http://cdn.discordapp.com/a.png")  # not https
    assert not hosts.allows("https://cdn.discordapp.com.evil.example/a.png")
    assert (
        hosts.built("https://media.discordapp.net/stickers/5.gif") == "http://127.0.0.1:8080/stickers/5.gif"
    )
    assert MediaHosts().built("https://cdn.discordapp.com/stickers/5.png") == (
        "https://cdn.discordapp.com/stickers/5.png"
    )
