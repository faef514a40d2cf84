"""PDFs for tests, made offline: pages drawn with Pillow, and an encrypted one written by hand."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def pdf_of_pages(count: int, size: tuple[int, int] = (612, 792)) -> bytes:
    """A ``count``-page PDF (US letter at 72 dpi by default), each page saying its number."""
    pages = []
    for number in range(1, count + 1):
        page = Image.new("RGB", size, "white")
        ImageDraw.Draw(page).text((72, 72), f"Page {number}: ALONE by Morgan Maxwell", fill="black")
        pages.append(page)
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buffer.getvalue()


def encrypted_pdf() -> bytes:
    """A one-page PDF behind the standard security handler, whose empty password does not open it."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    file_id = b"<" + b"ab" * 16 + b">"
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [%s %s] >>\n" % (
        len(objects) + 1,
        file_id,
        file_id,
    )
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)
