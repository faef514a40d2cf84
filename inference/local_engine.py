"""The in-process engine's front: the async API, the queue and places in line.

One worker thread loads the model and then serves: while the serving core has a free slot
it takes the next waiting request (``core.add``), and while anything runs it calls
``core.step()``. Text pieces come back to the event loop with ``call_soon_threadsafe``; the
loop never waits on the model. The core is ``core.EngineCore`` (continuous batching over
the native Phi-3-vision) or, for another vision model, ``generic_serving.GenericCore``
(batched ``generate``); the front cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .conversation import PromptError, build_prompt
from .engine import (
    EngineClosed,
    EngineError,
    GenerationError,
    GenerationRequest,
    ModelLoadError,
    StartProgress,
)
from .jobs import BATCH_GATHER_SECONDS, DONE, Job, release_gpu_memory
from .loading import LoadedModel, load_model
from .settings import InferenceSettings
from .steering import Steering

log = logging.getLogger(__name__)


class ServingCore(Protocol):
    """What the front needs of a core (core.EngineCore, generic_serving.GenericCore)."""

    @property
    def idle(self) -> bool:
        """Nothing admitted and running."""
        ...

    @property
    def room(self) -> int:
        """How many more requests could start now (for places in line)."""
        ...

    @property
    def decoding(self) -> str:
        """How it generates: "eager", "compiled" or "generic"."""
        ...

    def has_room(self) -> bool:
        """Whether ``add`` can take one more now."""
        ...

    def prepare(self, job: Job) -> None:
        """Encode the job's prompt (CPU only; on the preparing thread)."""
        ...

    def add(self, job: Job) -> Any:
        """Admit a prepared job; returns a ``core.Admission``."""
        ...

    def step(self) -> None:
        """Run one step of the admitted work."""
        ...

    def finish_all(self, item: Any = DONE) -> None:
        """End everything running with ``item``."""
        ...

    def close(self) -> None:
        """Stop its own threads, if any (the engine is closing)."""
        ...


def compile_wanted(settings: InferenceSettings, device_type: str) -> bool:
    """COMPILE: on, off, or auto (on with CUDA); off, with one log line, for weights that
    cannot run compiled there (quantization.compile_refusal)."""
    from .quantization import compile_refusal

    wanted = settings.compile == "on" or (settings.compile == "auto" and device_type == "cuda")
    refusal = compile_refusal(settings.quantize, device_type) if wanted else None
    if refusal is not None:
        log.info("COMPILE: decoding eagerly: %s", refusal)
    return wanted and refusal is None


def make_core(
    loaded: LoadedModel,
    settings: InferenceSettings,
    steering: Steering | None,
    on_progress: StartProgress | None = None,
) -> ServingCore:
    """The serving core for ``loaded``, warmed up (see warm_up.py; ``on_progress`` hears how
    far, on this thread)."""
    if getattr(loaded, "kind", "phi3v") == "generic":
        from .generic_serving import GenericCore

        return GenericCore(loaded, settings)
    from .warm_up import warmed_up_core

    return warmed_up_core(
        loaded,
        settings,
        steering=steering,
        compile=compile_wanted(settings, loaded.device.type),
        on_progress=on_progress,
    )


class LocalEngine:
    """Runs the model in this process (see the module docstring).

    ``steering``: an optional ``steering.Steering`` (the seam tests use for scripted replies).
    """

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        loader: Callable[[InferenceSettings], LoadedModel] = load_model,
        steering: Steering | None = None,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._steering = steering
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._loaded: LoadedModel | None = None
        self._core: ServingCore | None = None
        self._room = 0  # requests that could start at once (for places in line)
        # Encoding prompts (image crops, tokens) is CPU work: one thread of its own, so the
        # model's thread keeps stepping meanwhile (and one at a time: processors keep state).
        self._preparing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference-prepare")
        # How long the warm-up took at start-up (None: none ran).
        self.warm_up_seconds: float | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @property
    def core(self) -> ServingCore | None:
        return self._core

    @property
    def decoding(self) -> str:
        """How answers are generated: "eager", "compiled" or "generic" ("" before the start)."""
        return "" if self._core is None else self._core.decoding

    @property
    def joined_running(self) -> int:
        """Requests that joined a batch already decoding."""
        return int(getattr(self._core, "joined_running", 0))

    @property
    def waiting(self) -> int:
        """Requests in line, not yet running."""
        with self._lock:
            return len(self._waiting)

    async def start(self, on_progress: StartProgress | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def tell(progress: str) -> None:  # from the worker thread, before it settles ``ready``
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, progress)

        self._thread = threading.Thread(
            target=self._run, args=(loop, ready, tell), name="inference-worker", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 5)  # a step or two; a model still loading is abandoned
        self._fail_waiting(EngineClosed("the bot is shutting down"))
        self._preparing.shutdown(wait=False, cancel_futures=True)
        if self._core is not None:
            self._core.close()
        self._core = None  # the KV cache goes with it
        self._loaded = None
        release_gpu_memory()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._closing.is_set() or self._thread is None or not self._thread.is_alive():
            raise EngineClosed("the model is not running")
        try:
            build_prompt(request.conversation)  # a malformed conversation fails here, at once
        except PromptError as error:
            raise EngineError(str(error)) from error
        loop = asyncio.get_running_loop()
        job = Job(request, loop)
        core = self._core
        if core is not None:  # else the worker prepares it once the model is up
            try:
                await loop.run_in_executor(self._preparing, core.prepare, job)
            except EngineError:
                raise
            except Exception as error:
                log.exception("preparing a request failed")
                raise GenerationError(f"generation failed: {error}") from error
        with self._lock:
            self._waiting.append(job)
            self._lock.notify()
        self._announce_positions()
        try:
            while True:
                item = await job.pieces.get()
                if item is DONE:
                    if request.on_end is not None:
                        request.on_end("length" if job.hit_token_limit else "stop")
                    return
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed: {item}") from item
                yield item
        finally:
            # Reached on normal end, on error, on break/aclose and on task cancellation.
            job.cancelled.set()
            with self._lock:
                withdrawn = job in self._waiting
                if withdrawn:
                    self._waiting.remove(job)
            if withdrawn:
                self._announce_positions()

    def _announce_positions(self, started: Job | None = None) -> None:
        """Tell every waiting requester its place in line (runs on the event loop).

        Place 1 means "next, once a running answer makes room". Those the core has room for
        are about to start: they hear nothing until they do (0), so a bot with free slots
        shows no queue.
        """
        if started is not None:
            started.tell_position(0)
        with self._lock:
            waiting = list(self._waiting)
            room = self._room
        for index, job in enumerate(waiting):
            if index >= room:
                job.tell_position(index - room + 1)

    def _fail_waiting(self, error: EngineError) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            job.send(error)

    def _call_on_loop(self, job: Job, callback: Callable[..., None], *args: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is gone
            job.cancelled.set()

    # --- worker thread -------------------------------------------------------------------

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], tell: StartProgress
    ) -> None:
        try:
            started = time.perf_counter()
            tell("loading the model")
            self._loaded = self._loader(self.settings)
            loaded_at = time.perf_counter()
            tell("warming up")
            try:
                self._core = make_core(self._loaded, self.settings, self._steering, tell)
            except Exception as error:
                log.exception("the warm-up failed")
                self._loaded = None  # nothing half-loaded stays
                reason = (str(error).strip() or type(error).__name__).splitlines()[0]
                raise ModelLoadError(f"the model loaded but does not run: {reason}") from error
            self.warm_up_seconds = time.perf_counter() - loaded_at
            log.info(
                "model loaded in %.1f s, ready in %.1f s", loaded_at - started, time.perf_counter() - started
            )
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, ready, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        core = self._core
        try:
            self._serve(core)
            core.finish_all()  # shutting down: what was said so far is the answer
        except BaseException:
            log.critical("the model worker stopped", exc_info=True)
            core.finish_all(EngineClosed("the model worker stopped"))
            raise
        finally:
            # Whatever happens to this thread, nobody is left waiting for an answer.
            self._fail_waiting(EngineClosed("the model worker stopped"))

    def _serve(self, core: ServingCore) -> None:
        while True:
            with self._lock:
                self._room = core.room
                while not self._waiting and core.idle and not self._closing.is_set():
                    self._lock.wait()
                if self._closing.is_set():
                    return
                if core.idle and len(self._waiting) == 1:
                    # Requests often come in bursts: a moment's patience lets them start together.
                    self._lock.wait_for(
                        lambda: len(self._waiting) > 1 or self._closing.is_set(), BATCH_GATHER_SECONDS
                    )
            self._admit(core)
            if not core.idle:
                core.step()

    def _prepare(self, core: ServingCore, job: Job) -> bool:
        """Prepare a job that came in before the model was up (on the preparing thread, where
        every prompt is encoded); on failure tell its asker."""
        try:
            self._preparing.submit(core.prepare, job).result()
        except EngineError as error:
            job.send(error)
            return False
        except Exception as error:
            log.exception("preparing a request failed")
            job.send(error)
            return False
        return True

    def _admit(self, core: ServingCore) -> None:
        """Waiting requests into the core while it has room, in order."""
        took = False
        while core.has_room():
            with self._lock:
                if not self._waiting:
                    break
                job = self._waiting.popleft()
            took = True
            if job.encoded is None and not self._prepare(core, job):
                continue
            outcome = core.add(job)
            if outcome.name == "LATER":
                with self._lock:
                    self._waiting.appendleft(job)  # first in line for a later step
                break
            if outcome.name == "ADMITTED":
                self._call_on_loop(job, self._announce_positions, job)
        if took:
            with self._lock:
                self._room = core.room
                waiting = self._waiting[0] if self._waiting else None
            if waiting is not None:
                self._call_on_loop(waiting, self._announce_positions)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
