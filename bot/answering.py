"""Running one request: typing indicator, place in line, streamed reply, limits, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

import discord

from inference import (
    Conversation,
    EndReason,
    Engine,
    EngineClosed,
    EngineError,
    GenerationError,
    GenerationRequest,
)

from .cancel import CancelView
from .discord_calls import DISCORD_FAILURES, describe
from .questions import MessageKind, Question
from .replies import SendMessage, StreamingReply
from .texts import (
    EMPTY_ANSWER,
    MODEL_STOPPED,
    STARTING_UP,
    TOO_LONG,
    cancelled_by,
    could_not_answer,
    notice,
    out_of_gpu_memory,
    too_slow,
    waiting_status,
    went_wrong,
)

log = logging.getLogger(__name__)

TYPING_REFRESH_SECONDS = 8.0


class GenerationTimeout(Exception):
    """The answer ran past GENERATION_TIMEOUT_SECONDS."""


def generation_failed_notice(error: GenerationError) -> str:
    """Out of GPU memory says so (fewer or smaller images help); anything else is a bug report."""
    cause = error.__cause__ or error
    if type(cause).__name__ == "OutOfMemoryError" or "out of memory" in str(cause).lower():
        error_id = secrets.token_hex(4)
        log.error("out of GPU memory [error id %s]: %s", error_id, cause)
        return notice(out_of_gpu_memory(error_id))
    return unexpected_error_notice("generation", cause)


def unexpected_error_notice(what: str, error: BaseException) -> str:
    """Log a bug with a short id and return the reply that quotes it, so reports can be matched."""
    error_id = secrets.token_hex(4)
    log.error("%s failed [error id %s]", what, error_id, exc_info=error)
    return notice(went_wrong(error_id))


async def answer(
    engine: Engine,
    conversation: Conversation,
    send: SendMessage,
    *,
    edit_interval: float,
    timeout: float,
    question: Question | None = None,
    mark: Callable[[int, MessageKind], None] | None = None,
    typing_in: discord.abc.Messageable | None = None,
    engine_ready: asyncio.Event | None = None,
) -> str | None:
    """Stream the engine's answer to `send`; returns the answer, or None after a notice.

    With `question`, the first message carries a Cancel button for its asker (and
    moderators); pressing it stops the question (see `Question.stop`), as deleting its
    message does: the answer then ends with the question's stop notice and the
    cancellation propagates. Until `engine_ready` is set (the model loading and warming
    up), a status says so. `mark` hears what each message of the answer is.
    """
    view = None
    if question is not None:
        asked = question

        def cancel(user: discord.abc.User) -> None:
            asked.stop(f"user {user.id} pressed Cancel", cancelled_by(user.mention))

        view = CancelView(question.asker_id, cancel)
    reply = StreamingReply(
        send,
        edit_interval=edit_interval,
        first_message_view=view,
        label=question.label if question is not None else "an answer",
        mark=mark,
        channel_gone=(lambda: question.channel_gone) if question is not None else (lambda: False),
    )

    def generated() -> None:
        if question is not None:
            question.generated = True

    def stopped() -> bool:
        return question is not None and question.stopped_because is not None

    try:
        return await _answer(
            engine, conversation, reply, timeout, typing_in, engine_ready, generated, stopped
        )
    except asyncio.CancelledError:
        # In place of what is on screen (a status, the answer so far): with nothing shown,
        # a question deleted before its answer began leaves no trace.
        if question is not None and question.stop_notice is not None and reply.message_count:
            await reply.conclude(notice(question.stop_notice))
        raise
    finally:
        if view is not None:
            view.stop()
            await reply.remove_view()


async def _answer(
    engine: Engine,
    conversation: Conversation,
    reply: StreamingReply,
    timeout: float,
    typing_in: discord.abc.Messageable | None,
    engine_ready: asyncio.Event | None,
    generated: Callable[[], None],
    stopped: Callable[[], bool],
) -> str | None:
    places: asyncio.Queue[int] = asyncio.Queue()
    started = asyncio.Event()
    ended: list[EndReason] = []

    def on_place(place: int) -> None:
        if place == 0:
            started.set()
        places.put_nowait(place)

    request = GenerationRequest(conversation, on_queue_position=on_place, on_end=ended.append)
    status = asyncio.create_task(_show_places(reply, places))
    typing = typing_shown(typing_in) if typing_in is not None else contextlib.nullcontext()
    try:
        async with typing:
            if engine_ready is not None and not engine_ready.is_set():
                await _show_status(reply, STARTING_UP)
                await engine_ready.wait()
            pieces = _until_deadline(engine.stream(request), timeout, started, generated, stopped)
            async with contextlib.aclosing(pieces):
                text = await reply.stream(pieces)
    except GenerationTimeout:
        log.warning("%s: the answer was stopped after %s s", reply.label, timeout)
        await reply.conclude(notice(too_slow(timeout)))
        return None
    except GenerationError as error:  # the model failed, not the question: give an id to report
        await reply.conclude(generation_failed_notice(error))
        return None
    except EngineClosed:
        await reply.conclude(notice(MODEL_STOPPED))
        raise
    except EngineError as error:
        log.warning("%s: could not be answered: %s", reply.label, error)
        await reply.conclude(notice(could_not_answer(error)))
        return None
    except (*DISCORD_FAILURES, asyncio.CancelledError):
        raise
    except Exception as error:
        await reply.conclude(unexpected_error_notice(reply.label, error))
        return None
    finally:
        status.cancel()
    if not text.strip():
        await reply.conclude(EMPTY_ANSWER)
    elif ended == ["length"]:
        await reply.conclude(notice(TOO_LONG))
    return text


@contextlib.asynccontextmanager
async def typing_shown(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """ "Bot is typing…" in `channel` while the block runs. Best effort: a failing typing call
    is logged and retried at the next refresh, never a reason to lose the answer."""

    async def keep_typing() -> None:
        while True:
            try:
                await channel.typing()  # one call; Discord shows it for about 10 s
            except DISCORD_FAILURES as error:
                log.info(
                    "could not show typing in channel %s (%s)", getattr(channel, "id", "?"), describe(error)
                )
            await asyncio.sleep(TYPING_REFRESH_SECONDS)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()


async def _show_places(reply: StreamingReply, places: asyncio.Queue[int]) -> None:
    """Keep the requester's place in line on screen until the answer starts."""
    while (place := await places.get()) > 0:
        await _show_status(reply, waiting_status(place))


async def _show_status(reply: StreamingReply, status: str) -> None:
    try:
        await reply.show_status(status)
    except DISCORD_FAILURES as error:
        log.info("could not show a status (%s): %s", status, describe(error))


async def _until_deadline(
    pieces: AsyncIterator[str],
    seconds: float,
    started: asyncio.Event,
    at_end: Callable[[], None],
    stopped: Callable[[], bool],
) -> AsyncIterator[str]:
    """The pieces, stopped with `GenerationTimeout` once generating has taken `seconds`;
    `at_end` is called when the engine has given the last one.

    The clock starts when the engine starts this request (or at its first text, for engines
    that do not report it): time spent waiting in line does not count.
    """
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    async with contextlib.aclosing(pieces):  # type: ignore[type-var]
        while True:
            if deadline is None and started.is_set():
                deadline = loop.time() + seconds
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                piece = await asyncio.wait_for(anext(pieces), remaining)
            except StopAsyncIteration:
                at_end()
                return
            except asyncio.TimeoutError:
                raise GenerationTimeout from None
            if stopped():  # wait_for drops a cancellation that lands as a piece arrives (3.10, 3.11)
                raise asyncio.CancelledError
            if deadline is None:
                deadline = loop.time() + seconds
            yield piece
