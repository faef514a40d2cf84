"""The engine for an OpenAI-compatible chat-completions server, such as vLLM serving Phi-3-vision.

The server owns the GPU and batches concurrent requests; this engine only turns a conversation
into chat messages (images as data URIs, in order, so the server numbers them `<|image_N|>`
as the local prompt does), streams the answer over server-sent events, and retries the
failures that are worth retrying: connection errors, 429 and 5xx, and only before any text has
reached the caller, because a retry after that would repeat text the user has already seen.

Closing the iterator (or cancelling the task that iterates) closes the HTTP connection, which
is how vLLM learns to stop generating.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import aiohttp
from PIL import Image
from yarl import URL

from .conversation import Conversation, PromptError, build_prompt, neutralise, without_oldest_exchange
from .engine import (
    EngineClosed,
    EngineError,
    GenerationError,
    GenerationRequest,
    PromptTooLong,
    StartProgress,
)
from .settings import InferenceSettings

log = logging.getLogger(__name__)

# A photo as PNG can be tens of megabytes; above this size JPEG (quality 95) is sent instead.
# Screenshots and documents, where lossless matters for reading text, stay well below it.
MAX_PNG_BYTES = 4 * 1024 * 1024
JPEG_QUALITY = 95
# Waits between retries double from the configured delay up to this; a server that asks
# (Retry-After) for longer than MAX_RETRY_AFTER_SECONDS is reported busy instead of waited for.
MAX_BACKOFF_SECONDS = 8.0
MAX_RETRY_AFTER_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0
# One GET /models at start-up; a server whose socket is open but not yet serving hangs here.
PROBE_TIMEOUT_SECONDS = 10.0
# How much of an error body is read, and how much of its message is shown to users.
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_ERROR_MESSAGE_CHARS = 300
# How vLLM (and OpenAI) word a 400 for a conversation that does not fit: too many tokens for
# the context (max_model_len), or more images than --limit-mm-per-prompt allows.
_DOES_NOT_FIT = re.compile(
    r"context length|maximum model length|too long to fit|at most \d+ image|limit-mm-per-prompt",
    re.IGNORECASE,
)
# aiohttp >= 3.10 tells a connect timeout from a read timeout; older versions raise one type.
_CONNECT_TIMEOUT: tuple[type[Exception], ...] = tuple(
    error for error in (getattr(aiohttp, "ConnectionTimeoutError", None),) if error is not None
)


class _HTTPFailure(Exception):
    """A non-200 answer, with what the server said and how long it asked us to wait."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


class _StreamEnded(Exception):
    """The connection ended cleanly but without the `[DONE]` that closes a complete answer."""


class OpenAIEngine:
    """Answers through an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self._base_url = settings.openai_base_url.rstrip("/")
        # What users and logs see: never the credentials a URL can carry.
        self._shown_url = str(URL(self._base_url).with_user(None))
        self._session: aiohttp.ClientSession | None = None
        self._closing = False

    async def start(self, on_progress: StartProgress | None = None) -> None:
        """Connects and checks that the server serves the model, waiting while it starts up.

        vLLM takes minutes to load a model and the bot is often started alongside it, so a
        server that is not reachable yet (or answers 5xx) is polled for up to
        OPENAI_STARTUP_TIMEOUT_SECONDS; after that, or at once for a wrong URL, a rejected
        key or a model the server does not serve, this raises `EngineError` with a message
        that says what to fix.
        """
        if self._session is not None:
            raise RuntimeError("the engine was already started")
        self._closing = False
        headers = {"Accept": "text/event-stream, application/json"}
        if self.settings.openai_api_key:
            headers["Authorization"] = f"Bearer {self.settings.openai_api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(
                total=None,  # an answer may take minutes; only silence is a failure
                sock_connect=CONNECT_TIMEOUT_SECONDS,
                sock_read=self.settings.openai_timeout_seconds,
            ),
        )
        try:
            served = await self._wait_for_models(on_progress)
        except BaseException:
            await self.close()
            raise
        model = self.settings.served_model
        if served and model not in served:
            await self.close()
            raise EngineError(
                f"the model server at {self._shown_url} serves {', '.join(sorted(served))}, not {model}; "
                "set OPENAI_MODEL to the name it serves"
            )
        log.info("using model %s on the server at %s", model, self._shown_url)

    async def close(self) -> None:
        """Closes every connection: streams still running end with `EngineClosed`."""
        self._closing = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        session = self._session
        if session is None or self._closing:
            raise EngineClosed("the model is not running")
        try:
            build_prompt(request.conversation)  # the same checks as the local engine
        except PromptError as error:
            raise EngineError(str(error)) from error
        conversation = request.conversation
        dropped = 0
        while True:
            # Encoding images and serialising megabytes of base64 would stall the event loop.
            body = await asyncio.to_thread(self._request_body, request, conversation)
            try:
                finish_reasons: list[str] = []
                response, pieces, first = await self._open_stream(session, body, finish_reasons)
                break
            except PromptTooLong:
                # As the local engine does: leave out the oldest exchanges of a long thread
                # until the rest fits; the last question is never dropped.
                shorter = without_oldest_exchange(conversation)
                if shorter is None:
                    raise
                conversation, dropped = shorter, dropped + 1
        if dropped:
            log.info("left out the %d oldest exchange(s) to fit what the model server takes", dropped)
        try:
            if first is not None:
                yield first
                async for piece in pieces:
                    yield piece
            if request.on_end is not None:
                request.on_end("length" if "length" in finish_reasons else "stop")
        except EngineError:
            raise
        except Exception as error:
            raise self._failure_after_text(error) from error
        finally:
            # Reached on normal end, on error, on break/aclose and on task cancellation:
            # closing an unfinished response drops the connection, so the server stops.
            await pieces.aclose()
            response.close()

    # --- the request ---------------------------------------------------------------------

    def _request_body(self, request: GenerationRequest, conversation: Conversation) -> bytes:
        """The chat-completions request as JSON bytes (runs in a worker thread)."""
        settings = self.settings
        temperature = settings.temperature if request.temperature is None else request.temperature
        body: dict[str, Any] = {
            "model": settings.served_model,
            "messages": chat_messages(conversation),
            "stream": True,
            "max_tokens": request.max_new_tokens or settings.max_new_tokens,
            "temperature": temperature,  # 0 is greedy, as in the local engine
        }
        num_crops = request.num_crops or settings.num_crops
        if num_crops and conversation.images:
            # A vLLM extension; sent only when asked for, since other servers reject it.
            body["mm_processor_kwargs"] = {"num_crops": num_crops}
        return json.dumps(body).encode()

    async def _open_stream(
        self, session: aiohttp.ClientSession, body: bytes, finish_reasons: list[str]
    ) -> tuple[aiohttp.ClientResponse, AsyncGenerator[str, None], str | None]:
        """Posts the request and reads up to the first piece of text, retrying what is worth it.

        Until the first piece arrives nothing has been shown, so a failure can still be
        retried; the caller gets the open response, the rest of its pieces and the first one
        (None for an empty answer). Each choice's `finish_reason` lands in `finish_reasons`.
        """
        url = f"{self._base_url}/chat/completions"
        attempt = 0
        while True:
            response: aiohttp.ClientResponse | None = None
            pieces: AsyncGenerator[str, None] | None = None
            try:
                response = await session.post(url, data=body, headers={"Content-Type": "application/json"})
                if response.status != 200:
                    raise await _http_failure(response)
                pieces = _text_pieces(response, finish_reasons)
                first = await anext(pieces, None)
                return response, pieces, first
            except BaseException as error:
                if pieces is not None:
                    await pieces.aclose()
                if response is not None:
                    response.close()
                if not isinstance(error, Exception):
                    raise
                if self._closing:
                    raise EngineClosed("the bot is shutting down") from error
                delay = self._retry_delay(error, attempt)
                if delay is None:
                    raise self._failure_before_text(error, retried=attempt) from error
                log.warning(
                    "the model server at %s failed (%s); retry %d of %d in %.2g s",
                    self._shown_url,
                    _describe(error),
                    attempt + 1,
                    self.settings.openai_max_retries,
                    delay,
                )
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before trying again, or None when this error is final."""
        if attempt >= self.settings.openai_max_retries:
            return None
        if isinstance(error, _HTTPFailure):
            if not error.retryable:
                return None
            retry_after = error.retry_after
        elif isinstance(error, TimeoutError):
            # No answer within OPENAI_TIMEOUT_SECONDS: the server is overloaded or stuck, and
            # a second copy of the request would only add to its load.
            return None
        elif isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, _StreamEnded)):
            retry_after = None
        else:
            return None
        delay = backoff(self.settings.openai_retry_delay_seconds, attempt)
        if retry_after is not None:
            if retry_after > MAX_RETRY_AFTER_SECONDS:
                return None
            delay = max(delay, retry_after)
        return delay

    def _failure_before_text(self, error: Exception, *, retried: int) -> EngineError:
        """The message for a request that got no text at all; safe to show to users."""
        tries = f" (after {retried + 1} tries)" if retried else ""
        if isinstance(error, _HTTPFailure):
            if error.status == 429:
                return EngineError(f"the model server is busy ({error.message}); try again in a moment")
            if error.status >= 500:
                return EngineError(f"the model server failed{tries}: {error.message}")
            if error.status == 400 and _DOES_NOT_FIT.search(error.message):
                return PromptTooLong(
                    f"the question does not fit what the model server takes ({error.message}); "
                    "try fewer images or a shorter question"
                )
            return EngineError(f"the model server rejected the request: {error.message}")
        if isinstance(error, TimeoutError) and not isinstance(error, _CONNECT_TIMEOUT):
            return EngineError(
                f"the model server at {self._shown_url} did not answer within "
                f"{self.settings.openai_timeout_seconds:g} seconds"
            )
        if isinstance(error, (aiohttp.ClientConnectorError, *_CONNECT_TIMEOUT)):
            return EngineError(f"the model server at {self._shown_url} is not reachable{tries}")
        if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, _StreamEnded)):
            return EngineError(f"the model server at {self._shown_url} closed the connection{tries}")
        if isinstance(error, EngineError):
            return error
        return GenerationError(f"the model server's answer could not be read: {error}")

    def _failure_after_text(self, error: Exception) -> EngineError:
        """The message for an answer cut off after some of it was shown."""
        if self._closing:
            return EngineClosed("the bot is shutting down")
        if isinstance(error, TimeoutError):
            return GenerationError(
                f"the model server stopped answering for {self.settings.openai_timeout_seconds:g} seconds"
            )
        if isinstance(error, (aiohttp.ClientError, _StreamEnded)):
            return GenerationError("the model server closed the connection in the middle of the answer")
        return GenerationError(f"the model server's answer could not be read: {error}")

    # --- start-up --------------------------------------------------------------------------

    async def _wait_for_models(self, on_progress: StartProgress | None) -> set[str]:
        """The model names the server lists, polling while it is down or starting up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.openai_startup_timeout_seconds
        attempt = 0
        while True:
            try:
                return await self._list_models()
            except _HTTPFailure as error:
                if error.status in (401, 403):
                    raise EngineError(
                        f"the model server at {self._shown_url} rejected the API key "
                        f"(HTTP {error.status}: {error.message}); check OPENAI_API_KEY"
                    ) from error
                if error.status == 404:
                    raise EngineError(
                        f"no model list at {self._shown_url}/models (HTTP 404): is OPENAI_BASE_URL right? "
                        "For vLLM it ends in /v1"
                    ) from error
                if not error.retryable:
                    raise EngineError(
                        f"the model server at {self._shown_url} answered HTTP {error.status}: {error.message}"
                    ) from error
                reason: Exception = error
            except aiohttp.InvalidURL as error:
                raise EngineError(f"OPENAI_BASE_URL is not a usable URL: {self._shown_url}") from error
            except (aiohttp.ClientError, TimeoutError) as error:
                reason = error
            except ValueError as error:  # not JSON, or not a model list
                raise EngineError(
                    f"the server at {self._shown_url} is not an OpenAI-compatible server: "
                    f"GET /models gave no model list ({error})"
                ) from error
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EngineError(
                    f"the model server at {self._shown_url} is not reachable ({_describe(reason)}); "
                    "is it running, and is OPENAI_BASE_URL right?"
                ) from reason
            if attempt == 0:
                if on_progress is not None:
                    on_progress("waiting for the model server")
                log.warning(
                    "the model server at %s is not ready (%s); "
                    "waiting up to %g s (OPENAI_STARTUP_TIMEOUT_SECONDS)",
                    self._shown_url,
                    _describe(reason),
                    self.settings.openai_startup_timeout_seconds,
                )
            await asyncio.sleep(min(backoff(self.settings.openai_retry_delay_seconds, attempt), remaining))
            attempt += 1

    async def _list_models(self) -> set[str]:
        session = self._session
        if session is None:
            raise EngineClosed("the engine is closed")
        async with session.get(
            f"{self._base_url}/models", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_SECONDS)
        ) as response:
            if response.status != 200:
                raise await _http_failure(response)
            listing = await response.json(content_type=None)
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise ValueError("no 'data' list in the answer")
        return {str(model["id"]) for model in listing["data"] if isinstance(model, dict) and "id" in model}


# --- pure helpers (tested directly) --------------------------------------------------------


def chat_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The conversation as chat messages: each user turn's images first, then its text.

    That order is the local prompt's (`<|image_1|>\\n...question`); vLLM numbers the images
    across the whole conversation just as `build_prompt` does. Text is neutralised for the
    same reason as there: the server's template would read `<|end|>` in it as a real token.
    """
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        if turn.role == "assistant":
            messages.append({"role": "assistant", "content": neutralise(turn.text)})
            continue
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_uri(image)}} for image in turn.images
        ]
        content.append({"type": "text", "text": neutralise(turn.text)})
        messages.append({"role": "user", "content": content})
    return messages


def image_data_uri(image: Image.Image) -> str:
    """A `data:` URI for the image: PNG (lossless, best for reading text), JPEG if PNG is huge."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    media_type = "image/png"
    if buffer.tell() > MAX_PNG_BYTES:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        media_type = "image/jpeg"
    return f"data:{media_type};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def backoff(base: float, attempt: int) -> float:
    """Exponential backoff with jitter (so many clients do not retry in step), capped."""
    return min(base * 2**attempt, MAX_BACKOFF_SECONDS) * random.uniform(0.75, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(payload: Any, fallback: str) -> str:
    """The human message in an OpenAI-style error (`{"error": {"message": ...}}`), or vLLM's
    older flat form (`{"object": "error", "message": ...}`), cut to a readable length."""
    message: Any = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
        elif isinstance(error, str):
            message = error
        if message is None and isinstance(payload.get("detail"), str):  # FastAPI's own errors
            message = payload["detail"]
    text = str(message) if message else fallback
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_MESSAGE_CHARS:
        text = text[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
    return text


async def _http_failure(response: aiohttp.ClientResponse) -> _HTTPFailure:
    """What a non-200 answer says; reads at most MAX_ERROR_BODY_BYTES of its body."""
    raw = b""
    while len(raw) < MAX_ERROR_BODY_BYTES:
        chunk = await response.content.read(MAX_ERROR_BODY_BYTES - len(raw))
        if not chunk:
            break
        raw += chunk
    text = raw.decode("utf-8", "replace")
    try:
        payload: Any = json.loads(text)
    except ValueError:
        payload = None
    # A proxy's HTML error page (nginx's 413 or 502) says nothing a user should read.
    fallback = f"HTTP {response.status} {response.reason or ''}".strip()
    if response.content_type == "text/plain" and text.strip():
        fallback = text.strip()
    return _HTTPFailure(
        response.status,
        error_message(payload, fallback),
        parse_retry_after(response.headers.get("Retry-After")),
    )


async def _text_pieces(
    response: aiohttp.ClientResponse, finish_reasons: list[str]
) -> AsyncGenerator[str, None]:
    """The non-empty `choices[0].delta.content` pieces of a server-sent-event stream; each
    `finish_reason` the server gives ("stop", "length") is appended to `finish_reasons`.

    Raises `GenerationError` for an `error` event (vLLM reports failures mid-stream that way)
    and `_StreamEnded` when the stream stops without `[DONE]`. A server that ignored
    `stream: true` and sent one JSON answer is read too.
    """
    if response.content_type == "application/json":
        payload = await response.json()
        if isinstance(payload, dict) and ("error" in payload or payload.get("object") == "error"):
            raise GenerationError(f"the model server failed: {error_message(payload, 'unknown error')}")
        text = _message_text(payload)
        _note_finish(payload, finish_reasons)
        if text:
            yield text
        return
    data_lines: list[str] = []
    while True:
        raw = await response.content.readline()
        if not raw:  # end of the body
            break
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            if line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
            continue  # comments (": ping"), event: and id: lines carry nothing we need
        if not data_lines:
            continue
        data, data_lines = "\n".join(data_lines), []
        if data.strip() == "[DONE]":
            return
        piece = _event_text(data, finish_reasons)
        if piece:
            yield piece
    if data_lines and "\n".join(data_lines).strip() == "[DONE]":
        return
    raise _StreamEnded("the stream ended without [DONE]")


def _note_finish(event: Any, finish_reasons: list[str]) -> None:
    try:
        reason = event["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return
    if isinstance(reason, str):
        finish_reasons.append(reason)


def _event_text(data: str, finish_reasons: list[str]) -> str | None:
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("ignoring an event that is not JSON: %.200s", data)
        return None
    if not isinstance(event, dict):
        return None
    if "error" in event or event.get("object") == "error":
        raise GenerationError(f"the model server failed: {error_message(event, 'unknown error')}")
    choices = event.get("choices")
    if not isinstance(choices, Sequence) or not choices or not isinstance(choices[0], dict):
        return None  # e.g. a usage-only event
    _note_finish(event, finish_reasons)
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) and content else None


def _message_text(payload: Any) -> str | None:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _describe(error: BaseException) -> str:
    """A short reason for logs (never headers, so never the API key)."""
    if isinstance(error, _HTTPFailure):
        return str(error)
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect: {error.os_error.strerror or error.os_error}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
