"""Reading text page by page: headings, one generation per page in turn, the .txt copy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from PIL import Image

from bot.images import Picture
from bot.reading import PageByPage, RecordingSend, attach_text_file, headings_for, text_file_name
from inference import Conversation, GenerationRequest, StartProgress


def picture(name: str, page: int | None = None) -> Picture:
    return Picture(Image.new("RGB", (8, 8)), name, page)


def test_headings_name_pages_and_sources() -> None:
    assert headings_for([picture("scan.png")]) is None  # one image: read as a whole
    assert headings_for([picture("a.pdf", 1), picture("a.pdf", 2)]) == ["Page 1", "Page 2"]
    assert headings_for([picture("a.pdf", 1)]) == ["Page 1"]
    assert headings_for([picture("a.png"), picture("b.pdf", 1)]) == ["a.png", "b.pdf, page 1"]
    assert text_file_name([picture("report.pdf", 1)]) == "report.txt"


class ScriptedEngine:
    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    async def start(self, on_progress: StartProgress | None = None) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        for piece in ("text of ", f"image {len(self.requests)}"):
            yield piece


async def test_each_page_is_its_own_request_under_its_heading() -> None:
    engine = ScriptedEngine()
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    reader = PageByPage(engine, ["Page 1", "Page 2"])
    request = GenerationRequest(Conversation.single("Read it.", images), max_new_tokens=7)
    text = "".join([piece async for piece in reader.stream(request)])
    assert text == "### Page 1\ntext of image 1\n\n### Page 2\ntext of image 2"
    assert [r.conversation.images for r in engine.requests] == [[images[0]], [images[1]]]
    assert all(r.conversation.turns[0].text == "Read it." and r.max_new_tokens == 7 for r in engine.requests)


class Message:
    def __init__(self) -> None:
        self.edits: list[dict[str, Any]] = []

    async def edit(self, **fields: Any) -> None:
        self.edits.append(fields)


async def test_the_text_comes_as_a_file_only_when_it_takes_more_than_one_message() -> None:
    sent: list[Message] = []

    async def send(content: str, *, view: object = None) -> Message:
        sent.append(Message())
        return sent[-1]

    recording = RecordingSend(send)  # type: ignore[arg-type]
    await recording("first")
    await recording("second")
    assert recording.last is sent[-1]
    await attach_text_file(recording.last, "short", "a.txt")
    assert sent[-1].edits == []
    long_text = "word " * 1000
    await attach_text_file(recording.last, long_text, "a.txt")
    (edit,) = sent[-1].edits
    (file,) = edit["attachments"]
    assert file.filename == "a.txt" and file.fp.read() == long_text.encode()

