"""PDF documents as page images, rendered with pypdfium2 (Chrome's PDF engine).

A page is rendered as large as the model can use and no larger: its longer side at most
``max_long_side`` and its shorter side at most ``max_short_side`` pixels (the caller passes
the model's tile limits, 5376 and 1344 pixels for 16 tiles of 336), so text is as legible
as the model can see it and nothing is rendered only to be scaled away. Only the first
``max_pages`` pages are rendered; the caller says the rest were left out. A page whose size
at 72 dpi (PDF's own unit) passes ``max_pixels`` is refused before rendering, as an image's
header is. Blocking: call in a worker thread; PDFium is not thread-safe, so this renders one
document at a time in the process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pypdfium2 as pdfium
from PIL import Image

from .texts import encrypted_pdf, no_pages, page_too_large, unreadable_pdf

log = logging.getLogger(__name__)

PDF_SIGNATURE = b"%PDF-"
DEFAULT_MAX_PDF_PAGES = 4
_PDFIUM = threading.Lock()  # PDFium's state is process-wide and not thread-safe
_ERR_PASSWORD = 4  # FPDF_ERR_PASSWORD


class PdfProblem(Exception):
    """The PDF cannot be read; the message (a plain sentence) is shown to the person."""


def is_pdf(data: bytes) -> bool:
    """PDF readers accept the header anywhere in the first 1024 bytes; so does this."""
    return PDF_SIGNATURE in data[:1024]


@dataclass
class RenderedPdf:
    pages: list[Image.Image]
    total_pages: int


def render_scale(width: float, height: float, max_long_side: int, max_short_side: int) -> float:
    """Pixels per point for a ``width`` x ``height`` point page: as large as the limits allow."""
    scale = min(max_long_side / max(width, height), max_short_side / min(width, height))
    return scale * 0.9999  # PDFium rounds sizes up: stay within the limits


def render_pdf(
    data: bytes,
    name: str,
    *,
    max_pages: int,
    max_pixels: int,
    max_long_side: int,
    max_short_side: int,
) -> RenderedPdf:
    """The first ``max_pages`` pages as RGB images, or :class:`PdfProblem`."""
    with _PDFIUM:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as error:
            log.info("cannot open %s: %s", name, error)
            if getattr(error, "err_code", None) == _ERR_PASSWORD:
                raise PdfProblem(encrypted_pdf(name)) from error
            raise PdfProblem(unreadable_pdf(name)) from error
        try:
            total = len(document)
            if total < 1:
                raise PdfProblem(no_pages(name))
            pages = [
                _render_page(document, index, name, max_pixels, max_long_side, max_short_side)
                for index in range(min(total, max_pages))
            ]
            return RenderedPdf(pages, total)
        except pdfium.PdfiumError as error:
            log.info("cannot render %s: %s", name, error)
            raise PdfProblem(unreadable_pdf(name)) from error
        finally:
            document.close()


def _render_page(
    document: pdfium.PdfDocument,
    index: int,
    name: str,
    max_pixels: int,
    max_long_side: int,
    max_short_side: int,
) -> Image.Image:
    page = document[index]
    try:
        width, height = page.get_size()
        if not (width >= 1 and height >= 1):
            raise PdfProblem(unreadable_pdf(name))
        if width * height > max_pixels:
            log.info("refused %s page %d: %.0f x %.0f points", name, index + 1, width, height)
            raise PdfProblem(page_too_large(name, index + 1, width * height, max_pixels))
        scale = render_scale(width, height, max_long_side, max_short_side)
        bitmap = page.render(scale=scale, fill_color=(255, 255, 255, 255), may_draw_forms=True)
        try:
            return bitmap.to_pil().convert("RGB")
        finally:
            bitmap.close()
    finally:
        page.close()
