"""Reading text (/ocr, Read text): a document page by page, and the whole text as a file.

One image is read as one answer. Several (a PDF's pages, or a message with more than one
image) are read one at a time, each under its own heading (``### Page 2``), streamed into
the same reply: the model reads one page better than four at once, and a person can tell
which text came from where. An answer longer than one message also comes as a ``.txt``
file on its last message, for copying.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import PurePosixPath

import discord

from inference import Conversation, EndReason, Engine, GenerationRequest, StartProgress

from .images import Picture
from .replies import MESSAGE_LIMIT, EditableMessage, SendMessage
from .splitting import split_message

log = logging.getLogger(__name__)


def headings_for(pictures: Sequence[Picture]) -> list[str] | None:
    """A heading per picture, or None when there is one image to read as a whole."""
    if len(pictures) == 1 and pictures[0].page is None:
        return None
    one_source = len({picture.name for picture in pictures}) == 1
    return [
        (f"Page {p.page}" if one_source else f"{p.name}, page {p.page}") if p.page is not None else p.name
        for p in pictures
    ]


class PageByPage:
    """An engine that reads each image of a request on its own, under its heading, in turn.

    It has the engine interface, so an answer streams it like any other; each page waits in
    line as its own request, and cancelling the answer stops the page being read.
    """

    def __init__(self, engine: Engine, headings: Sequence[str]) -> None:
        self._engine = engine
        self._headings = list(headings)

    async def start(self, on_progress: StartProgress | None = None) -> None:
        await self._engine.start(on_progress)

    async def close(self) -> None:
        await self._engine.close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        turn = request.conversation.turns[-1]
        ends: list[EndReason] = []
        for index, (heading, image) in enumerate(zip(self._headings, turn.images, strict=True)):
            yield ("\n\n" if index else "") + f"### {heading}\n"
            page = dataclasses.replace(
                request, conversation=Conversation.single(turn.text, [image]), on_end=ends.append
            )
            async with contextlib.aclosing(self._engine.stream(page)) as pieces:  # type: ignore[type-var]
                async for piece in pieces:
                    yield piece
        if request.on_end is not None and ends:  # one end for the whole reading: "length" if a page hit it
            request.on_end("length" if "length" in ends else ends[-1])


class RecordingSend:
    """Passes messages to ``send`` and remembers the last one (where the file goes)."""

    def __init__(self, send: SendMessage) -> None:
        self._send = send
        self.last: EditableMessage | None = None

    async def __call__(self, content: str, *, view: object = None) -> EditableMessage:
        message = await self._send(content, view=view)
        self.last = message
        return message


def text_file_name(pictures: Sequence[Picture]) -> str:
    stem = PurePosixPath(pictures[0].name).stem if pictures else ""
    return f"{stem or 'text'}.txt"


async def attach_text_file(message: EditableMessage | None, text: str, filename: str) -> None:
    """The whole ``text`` as a file on ``message``, when the answer took more than one message."""
    if message is None or len(split_message(text, MESSAGE_LIMIT)) < 2:
        return
    file = discord.File(io.BytesIO(text.encode()), filename=filename)
    try:
        await message.edit(attachments=[file], allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as error:
        log.warning("could not attach %s to the answer: %s", filename, error)
