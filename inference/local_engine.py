"""The in-process engine: one worker thread owns the model; requests wait in a queue.

Several threads calling `generate` on one model gain nothing and race on GPU memory, so
exactly one thread loads the model and runs every request. Text pieces come back to the
event loop with `call_soon_threadsafe`; the loop never waits on the GPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from .conversation import PromptError, build_prompt
from .engine import EngineClosed, EngineError, GenerationError, GenerationRequest
from .loading import LoadedModel, load_model
from .settings import InferenceSettings

log = logging.getLogger(__name__)

_DONE = object()
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


@dataclass
class _Job:
    request: GenerationRequest
    prompt: str
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Any) -> None:
        """Hand an item to the waiting coroutine; safe from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class _StopWhen(StoppingCriteria):
    """Ends `generate` at the next token once any of the events is set."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self._events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _PieceStreamer(TextStreamer):
    """Decodes new tokens into readable pieces (whole words where it can) for a callback.

    `skip_prompt=True` is required: the prompt holds negative image ids that cannot be decoded.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._emit = emit

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._emit(text)


def default_num_crops(image_count: int) -> int:
    """The model cards' advice: 16 crops for a single image, 4 for multi-image prompts."""
    return 16 if image_count <= 1 else 4


class LocalEngine:
    """Runs a Phi-3-vision model in this process (see the module docstring)."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        loader: Callable[[InferenceSettings], LoadedModel] = load_model,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._loaded: LoadedModel | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="inference-worker", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        self._closing.set()
        self._jobs.put(None)
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 30)
        while True:  # whatever is still queued will never run
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(EngineClosed("the bot is shutting down"))
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._closing.is_set() or self._thread is None or not self._thread.is_alive():
            raise EngineClosed("the model is not running")
        try:
            prompt = build_prompt(request.conversation)
        except PromptError as error:
            raise EngineError(str(error)) from error
        job = _Job(request, prompt, asyncio.get_running_loop())
        self._jobs.put(job)
        try:
            while True:
                item = await job.pieces.get()
                if item is _DONE:
                    return
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed: {item}") from item
                yield item
        finally:
            # Reached on normal end, on error, on break/aclose and on task cancellation.
            job.cancelled.set()

    # --- worker thread -------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            self._loaded = self._loader(self.settings)
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, ready, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        while not self._closing.is_set():
            job = self._jobs.get()
            if job is None:
                break
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except Exception as error:
                log.exception("generation failed")
                _release_gpu_memory()
                job.send(error)
            else:
                job.send(_DONE)

    def _generate(self, job: _Job) -> None:
        loaded = self._loaded
        assert loaded is not None
        request = job.request
        images = [
            image if image.mode == "RGB" else image.convert("RGB") for image in request.conversation.images
        ]
        processor = loaded.processor
        if images:
            processor.image_processor.num_crops = (
                request.num_crops or self.settings.num_crops or default_num_crops(len(images))
            )
        encoded = processor(job.prompt, images or None, return_tensors="pt")
        # Only what the model takes: some tokenizers add token_type_ids, which generate rejects.
        inputs = {name: encoded[name].to(loaded.device) for name in MODEL_INPUTS if name in encoded}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        temperature = self.settings.temperature if request.temperature is None else request.temperature
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        tokenizer = loaded.tokenizer
        with torch.inference_mode():
            loaded.model.generate(
                **inputs,
                **sampling,
                max_new_tokens=request.max_new_tokens or self.settings.max_new_tokens,
                eos_token_id=loaded.stop_token_ids,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                streamer=_PieceStreamer(tokenizer, job.send),
                stopping_criteria=StoppingCriteriaList([_StopWhen(job.cancelled, self._closing)]),
            )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _release_gpu_memory() -> None:
    """After a failure (often out-of-memory) give the cached blocks back for the next request."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
