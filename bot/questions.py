"""The questions being answered, and what each of the bot's own messages is.

A question is found by the asker's message (deleting it withdraws the question) and by the
channel its answer goes to (deleting that thread withdraws every question answered there).
Withdrawing cancels the question's task at once: its place in line and its generation go.
Follow-ups in one thread are answered in order: each waits for the questions asked there
before it, so its conversation holds their finished answers.

The kinds of the bot's messages (an answer, a notice, a status, an answer still being
written) are kept by message id, so a thread's rebuild never takes a status or a half-written
answer for a finished one, whatever their text says.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from .texts import QUESTION_DELETED

log = logging.getLogger(__name__)

MessageKind = Literal["answer", "notice", "status", "writing"]
KINDS_REMEMBERED = 50_000


@dataclass(eq=False)
class Question:
    """One question in flight: `id` is the asker's message id or the interaction id."""

    id: int
    asker_id: int
    channel_id: int  # where the answer goes (the thread, once it is made)
    task: asyncio.Task[object]
    message_id: int | None = None  # the asker's message; None for a slash command
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Why it was stopped before its end ("its thread was deleted"), and the notice to leave
    # in the answer's place (None: nowhere to leave one, or nothing to say).
    stopped_because: str | None = None
    stop_notice: str | None = None
    channel_gone: bool = False  # its answer's channel was deleted: nothing more to write there
    generated: bool = False  # the engine gave the whole answer; only writes to Discord are left

    @property
    def label(self) -> str:
        return f"question {self.id} from user {self.asker_id}"

    def stop(self, because: str, notice: str | None = None, *, even_when_generated: bool = False) -> None:
        """Cancel the question's task (its wait in line, its download, its generation), once.
        Once the whole answer is generated (only its last writes to Discord are left) there
        is nothing to stop: the answer stays whole, unless `even_when_generated` (its
        channel is gone)."""
        if self.stopped_because is not None or self.task.done():
            return
        if self.generated and not even_when_generated:
            log.info("%s: not stopped (%s): the answer is complete", self.label, because)
            return
        self.stopped_because, self.stop_notice = because, notice
        log.info("%s: stopping, %s", self.label, because)
        self.task.cancel()


class Questions:
    """The questions in flight, and the kinds of the bot's recent messages."""

    def __init__(self) -> None:
        self._questions: dict[int, Question] = {}
        self._kinds: collections.OrderedDict[int, MessageKind] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._questions)

    @contextlib.contextmanager
    def asked(
        self, question_id: int, asker_id: int, channel_id: int, *, message_id: int | None = None
    ) -> Iterator[Question]:
        """Track the current task as a question while the block runs."""
        task = asyncio.current_task()
        assert task is not None
        question = Question(question_id, asker_id, channel_id, task, message_id)
        self._questions[question_id] = question
        try:
            yield question
        finally:
            self._questions.pop(question_id, None)
            question.done.set()

    def earlier_in(self, question: Question) -> list[Question]:
        """The questions answered in the same channel that were asked before `question`."""
        return [
            other
            for other in self._questions.values()
            if other.id < question.id
            # the channel's questions, and the one a thread was made from (not yet moved there)
            and question.channel_id in (other.channel_id, other.message_id)
        ]

    async def wait_for_earlier(self, question: Question) -> None:
        """Return once the questions asked before `question` in its channel are answered."""
        for other in self.earlier_in(question):
            await other.done.wait()

    def message_deleted(self, message_id: int) -> None:
        for question in list(self._questions.values()):
            if question.message_id == message_id:
                question.stop(
                    f"its message {message_id} was deleted",
                    QUESTION_DELETED,
                )

    def channel_deleted(self, channel_id: int) -> None:
        for question in list(self._questions.values()):
            if question.channel_id == channel_id:
                question.channel_gone = True
                question.stop(
                    f"the channel or thread {channel_id} it is answered in was deleted",
                    even_when_generated=True,
                )

    # --- the bot's own messages -----------------------------------------------------------

    def mark(self, message_id: int, kind: MessageKind) -> None:
        self._kinds[message_id] = kind
        self._kinds.move_to_end(message_id)
        while len(self._kinds) > KINDS_REMEMBERED:
            self._kinds.popitem(last=False)

    def kind_of(self, message_id: int) -> MessageKind | None:
        """What the bot's message is; None for one written before this run (or long ago)."""
        return self._kinds.get(message_id)

    @property
    def kinds_remembered(self) -> int:
        return len(self._kinds)
