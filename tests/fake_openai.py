"""A fake OpenAI-compatible server on loopback: `/v1/models` and streaming `/v1/chat/completions`.

It answers like vLLM does (a role-only first delta, content deltas, a finish delta, a
usage-only event, `[DONE]`), records every request so tests can check the messages and images
sent, and misbehaves on demand: fail the next requests with a status (429 with Retry-After,
500, 400 with an OpenAI-style error body), drop the connection before or during an answer, or
send an error event mid-stream. When a client closes a stream early it sets `client_closed`,
so tests await that event instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
DEFAULT_REPLY = "Hello there, my friend! How are you today?"
IMAGE_TOKENS = 100  # what one image costs in the fake's context

Endpoint = Literal["chat", "models"]


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class _Fault:
    kind: Literal["status", "drop", "error_event"]
    status: int = 500
    message: str = ""
    retry_after: str | None = None
    after_chunks: int = 0
    html: bool = False


@dataclass
class FakeOpenAI:
    models: Sequence[str] = (DEFAULT_MODEL,)
    # When set, requests without `Authorization: Bearer <api_key>` get 401.
    api_key: str | None = None
    chunks: list[str] = field(default_factory=lambda: split_reply(DEFAULT_REPLY))
    # Seconds to wait before each content chunk.
    chunk_delay: float = 0.0
    # Like vLLM's --limit-mm-per-prompt: more images in one request get a 400.
    max_images: int | None = None
    # Like vLLM's --max-model-len, counting a token per word and IMAGE_TOKENS per image.
    context_tokens: int | None = None

    requests: list[RecordedRequest] = field(default_factory=list, init=False)
    model_list_requests: int = field(default=0, init=False)
    completed: int = field(default=0, init=False)  # streams sent to the end
    closed_by_client: int = field(default=0, init=False)  # streams the client closed early
    client_closed: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    base_url: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self._faults: dict[Endpoint, deque[_Fault]] = {"chat": deque(), "models": deque()}
        self._runner: web.AppRunner | None = None

    # --- programming it ------------------------------------------------------------------

    def set_reply(self, text: str) -> None:
        self.chunks = split_reply(text)

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        message: str | None = None,
        retry_after: str | None = None,
        endpoint: Endpoint = "chat",
        html: bool = False,
    ) -> None:
        """The next `count` requests to `endpoint` get `status` with an OpenAI-style error body
        (or, with `html`, the HTML page a proxy such as nginx sends)."""
        fault = _Fault("status", status, message or f"fake failure {status}", retry_after, html=html)
        self._faults[endpoint].extend([fault] * count)

    def drop_next(self, count: int = 1, *, after_chunks: int = 0) -> None:
        """The next `count` chat requests lose their connection after `after_chunks` chunks
        (0: before any answer, not even the status line)."""
        self._faults["chat"].extend([_Fault("drop", after_chunks=after_chunks)] * count)

    def error_event_next(self, message: str, *, after_chunks: int = 0) -> None:
        """The next chat stream sends an `error` event after `after_chunks` chunks, then ends."""
        self._faults["chat"].append(_Fault("error_event", message=message, after_chunks=after_chunks))

    # --- running it ----------------------------------------------------------------------

    async def start(self) -> str:
        """Serves on a free port of 127.0.0.1; returns the base URL (`http://127.0.0.1:N/v1`)."""
        app = web.Application()
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a client that hangs up cancels the handler at once, even
        # while it waits between chunks, so `client_closed` is set without delay.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    # --- handlers ------------------------------------------------------------------------

    def _does_not_fit(self, body: dict[str, Any]) -> web.Response | None:
        """vLLM's 400s for too many images and for a prompt too long for the context."""
        images = words = 0
        for message in body["messages"]:
            content = message.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            for part in parts:
                if part.get("type") == "image_url":
                    images += 1
                else:
                    words += len(str(part.get("text", "")).split())
        if self.max_images is not None and images > self.max_images:
            return error_response(400, f"At most {self.max_images} image(s) may be provided in one prompt.")
        prompt = words + IMAGE_TOKENS * images
        wanted = prompt + int(body.get("max_tokens") or 0)
        if self.context_tokens is not None and wanted > self.context_tokens:
            return error_response(
                400,
                f"This model's maximum context length is {self.context_tokens} tokens. However, you "
                f"requested {wanted} tokens ({prompt} in the messages, {body.get('max_tokens')} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        return None

    def _unauthorised(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return error_response(401, "Incorrect API key provided.", "AuthenticationError")

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        self.model_list_requests += 1
        if (refused := self._unauthorised(request)) is not None:
            return refused
        fault = self._faults["models"].popleft() if self._faults["models"] else None
        if fault is not None:
            return _fault_response(fault)
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "vllm"} for name in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body: dict[str, Any] | None = await request.json()
        except ValueError:
            body = None
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        if (refused := self._unauthorised(request)) is not None:
            return refused
        fault = self._faults["chat"].popleft() if self._faults["chat"] else None
        if fault is not None and fault.kind == "status":
            return _fault_response(fault)
        if body is None or not isinstance(body.get("messages"), list):
            return error_response(400, "messages: field required")
        if body.get("model") not in self.models:
            return error_response(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        if (refused := self._does_not_fit(body)) is not None:
            return refused
        if fault is not None and fault.kind == "drop" and fault.after_chunks == 0:
            _hang_up(request)
            return web.Response()  # never sent: the connection is gone

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        model = body["model"]
        try:
            await response.write(b": keep-alive comment, ignored by clients\n\n")
            await _send(response, _chunk(model, {"role": "assistant", "content": ""}))
            # A chunk is a token here: like a real server, stop at max_tokens and say so.
            limit = body.get("max_tokens")
            chunks = self.chunks[:limit] if isinstance(limit, int) and limit > 0 else self.chunks
            for index, piece in enumerate(chunks):
                if fault is not None and fault.after_chunks == index:
                    if fault.kind == "drop":
                        _hang_up(request)
                        return response
                    await _send(response, {"error": {"message": fault.message, "code": 500}})
                    await response.write(b"data: [DONE]\n\n")
                    return response
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                await _send(response, _chunk(model, {"content": piece}))
            finish = "length" if len(chunks) < len(self.chunks) else "stop"
            await _send(response, _chunk(model, {}, finish_reason=finish))
            await _send(response, {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": []})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_by_client += 1
            self.client_closed.set()
            raise
        self.completed += 1
        return response


def split_reply(text: str) -> list[str]:
    """Word-sized chunks, each with its leading space, the way token streams arrive."""
    return re.findall(r"\s*\S+", text) or [text]


def error_response(
    status: int, message: str, kind: str = "BadRequestError", *, retry_after: str | None = None
) -> web.Response:
    """An error in the OpenAI (and current vLLM) shape: `{"error": {"message": ...}}`."""
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _fault_response(fault: _Fault) -> web.Response:
    if fault.html:
        page = f"<html><body><center><h1>{fault.status}</h1></center><hr>nginx</body></html>"
        return web.Response(status=fault.status, text=page, content_type="text/html")
    return error_response(fault.status, fault.message, retry_after=fault.retry_after)


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released), for 'server down' tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())


def _hang_up(request: web.Request) -> None:
    """Drop the TCP connection as a crashed server would (no HTTP ending)."""
    if request.transport is not None:
        request.transport.abort()
