"""Running one request: typing indicator, place in line, streamed reply, limits, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import discord

from inference import Conversation, Engine, EngineClosed, EngineError, GenerationError, GenerationRequest

from .cancel import CancelView
from .history import NOTICE_PREFIX, WAITING_PREFIX
from .replies import SendMessage, StreamingReply

log = logging.getLogger(__name__)

EMPTY_ANSWER = f"{NOTICE_PREFIX} The model gave an empty answer. Try asking another way."


class GenerationTimeout(Exception):
    """The answer ran past GENERATION_TIMEOUT_SECONDS."""


def notice(text: str) -> str:
    return f"{NOTICE_PREFIX} {text}"


def waiting_status(place: int) -> str:
    ahead = "1 question is" if place == 1 else f"{place} questions are"
    return f"{WAITING_PREFIX} Waiting in line: {ahead} ahead of yours."


STARTING_UP = (
    f"{WAITING_PREFIX} Just a moment: I'm starting up (loading and warming up the model). "
    "I'll answer as soon as I'm ready."
)
MODEL_STOPPED = "The model stopped working, so I'm restarting. Please ask again in a minute."


def generation_failed_notice(error: GenerationError) -> str:
    """Out of GPU memory says so (fewer or smaller images help); anything else is a bug report."""
    cause = error.__cause__ or error
    if type(cause).__name__ == "OutOfMemoryError" or "out of memory" in str(cause).lower():
        error_id = secrets.token_hex(4)
        log.error("out of GPU memory [error id %s]: %s", error_id, cause)
        return notice(
            f"The GPU ran out of memory on this question (error id `{error_id}`). "
            "Try fewer or smaller images, or ask again when the bot is less busy."
        )
    return unexpected_error_notice("generation", cause)


def unexpected_error_notice(what: str, error: BaseException) -> str:
    """Log a bug with a short id and return the reply that quotes it, so reports can be matched."""
    error_id = secrets.token_hex(4)
    log.error("%s failed [error id %s]", what, error_id, exc_info=error)
    return notice(f"Something went wrong on my side (error id `{error_id}`).")


async def answer(
    engine: Engine,
    conversation: Conversation,
    send: SendMessage,
    *,
    edit_interval: float,
    timeout: float,
    requester_id: int | None = None,
    typing_in: discord.abc.Messageable | None = None,
    engine_ready: asyncio.Event | None = None,
) -> str | None:
    """Stream the engine's answer to `send`; returns the answer, or None after a notice.

    With `requester_id`, the first message carries a Cancel button for that person (and
    moderators); pressing it stops the generation or takes the request out of the line.
    Until `engine_ready` is set (the model loading and warming up), a status says so.
    """
    cancelled_by: list[discord.abc.User] = []
    work: asyncio.Task[str | None] | None = None

    def cancel(user: discord.abc.User) -> None:
        cancelled_by.append(user)
        if work is not None:
            work.cancel()

    view = CancelView(requester_id, cancel) if requester_id is not None else None
    reply = StreamingReply(send, edit_interval=edit_interval, first_message_view=view)
    work = asyncio.create_task(_answer(engine, conversation, reply, timeout, typing_in, engine_ready))
    try:
        return await work
    except asyncio.CancelledError:
        if not (work.done() and work.cancelled() and cancelled_by):
            work.cancel()  # the caller is being cancelled (shutdown): stop the work too
            raise
        await reply.conclude(notice(f"Cancelled by {cancelled_by[0].mention}."))
        return None
    finally:
        if view is not None:
            view.stop()
            with contextlib.suppress(discord.HTTPException):
                await reply.remove_view()


async def _answer(
    engine: Engine,
    conversation: Conversation,
    reply: StreamingReply,
    timeout: float,
    typing_in: discord.abc.Messageable | None,
    engine_ready: asyncio.Event | None,
) -> str | None:
    places: asyncio.Queue[int] = asyncio.Queue()
    started = asyncio.Event()

    def on_place(place: int) -> None:
        if place == 0:
            started.set()
        places.put_nowait(place)

    request = GenerationRequest(conversation, on_queue_position=on_place)
    status = asyncio.create_task(_show_places(reply, places))
    typing = typing_in.typing() if typing_in is not None else contextlib.nullcontext()
    try:
        async with typing:
            if engine_ready is not None and not engine_ready.is_set():
                await _show_status(reply, STARTING_UP)
                await engine_ready.wait()
            pieces = _until_deadline(engine.stream(request), timeout, started)
            async with contextlib.aclosing(pieces):
                text = await reply.stream(pieces)
    except GenerationTimeout:
        log.warning("answer stopped after %s s", timeout)
        await reply.conclude(notice(f"I stopped this answer: it took longer than {timeout:g} seconds."))
        return None
    except GenerationError as error:  # the model failed, not the question: give an id to report
        await reply.conclude(generation_failed_notice(error))
        return None
    except EngineClosed:
        await reply.conclude(notice(MODEL_STOPPED))
        raise
    except EngineError as error:
        log.warning("request failed: %s", error)
        await reply.conclude(notice(f"Sorry, I could not answer: {error}"))
        return None
    except (discord.HTTPException, asyncio.CancelledError):
        raise
    except Exception as error:
        await reply.conclude(unexpected_error_notice("request", error))
        return None
    finally:
        status.cancel()
    if not text.strip():
        await reply.conclude(EMPTY_ANSWER)
    return text


async def _show_places(reply: StreamingReply, places: asyncio.Queue[int]) -> None:
    """Keep the requester's place in line on screen until the answer starts."""
    while (place := await places.get()) > 0:
        await _show_status(reply, waiting_status(place))


async def _show_status(reply: StreamingReply, status: str) -> None:
    try:
        await reply.show_status(status)
    except discord.HTTPException as error:
        log.info("could not show a status (%s): %s", status, error)


async def _until_deadline(
    pieces: AsyncIterator[str], seconds: float, started: asyncio.Event
) -> AsyncIterator[str]:
    """The pieces, stopped with `GenerationTimeout` once generating has taken `seconds`.

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
                return
            except asyncio.TimeoutError:
                raise GenerationTimeout from None
            if deadline is None:
                deadline = loop.time() + seconds
            yield piece
