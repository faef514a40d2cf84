"""Start-up: the engine core made and warmed up before the first question.

Compiled (COMPILE; CUDA graphs on CUDA), the first decode step of a new shape compiles or
records a graph: seconds to tens of seconds for a 4B model. The warm-up runs every shape
the settings allow (with CUDA graphs, the runner's row buckets x length buckets of the
usual cache; on the CPU, one graph of symbolic shapes: one row and two rows), on slot 0
before any question holds it, so no question waits for it; compiled artefacts are kept on disk
(COMPILE_CACHE_DIR) for the next start. If compiling fails the engine decodes eagerly (one
log line). Eager, one step checks the model runs. The usual cache's slots hold a question
about one 1280x720 picture (at the default crops) and its MAX_NEW_TOKENS answer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from PIL import Image

from .conversation import Conversation
from .core import EngineCore
from .engine import StartProgress
from .jobs import release_gpu_memory
from .loading import LoadedModel
from .runner import ModelRunner, row_buckets
from .settings import InferenceSettings
from .steering import Steering

log = logging.getLogger(__name__)

WARM_UP_QUESTION = "Describe this picture."
WARM_UP_PICTURE_SIZE = (1280, 720)
# torch.compile(mode="reduce-overhead"): the 1st call of a shape compiles (or warms), CUDA
# graphs are recorded on a later one; a few runs make sure questions replay them.
WARM_UP_RUNS = 3


def picture_question() -> Conversation:
    return Conversation.single(WARM_UP_QUESTION, [Image.new("RGB", WARM_UP_PICTURE_SIZE, (128, 128, 128))])


def warm_up_shapes(runner: ModelRunner) -> list[tuple[int, int]]:
    """The decode shapes the runner can run: every (rows, length) bucket when compiled; one
    small shape eagerly."""
    cache = runner.cache
    if not runner.compile:
        return [(1, 1)]
    if not runner.graphs:  # one graph of symbolic shapes; one row is its own specialisation
        length = min(64, cache.length)
        return sorted({(1, length), (min(2, cache.slots), length)})
    lengths = range(runner.length_bucket, cache.length + 1, runner.length_bucket)
    return [(rows, length) for rows in row_buckets(cache.slots) for length in lengths]


def warm_up(runner: ModelRunner, on_progress: StartProgress | None = None) -> list[tuple[int, int]]:
    """Run every warm-up shape, telling ``on_progress`` after each; returns them."""
    shapes = warm_up_shapes(runner)
    runs = WARM_UP_RUNS if runner.compile else 1
    started = time.perf_counter()
    for done, (rows, length) in enumerate(shapes, 1):
        for _ in range(runs):
            runner.run_shape(rows, length)
        if on_progress is not None and runner.compile:
            on_progress(f"warming up: {done} of {len(shapes)} decode shapes")
        if runner.compile and (done % 8 == 0 or done == len(shapes)):
            log.info(
                "warming up: %d of %d decode shapes (%.0f s)",
                done,
                len(shapes),
                time.perf_counter() - started,
            )
    return shapes


def warmed_up_core(
    loaded: LoadedModel,
    settings: InferenceSettings,
    *,
    steering: Steering | None,
    compile: bool,
    on_progress: StartProgress | None = None,
) -> EngineCore:
    """The engine core for ``loaded``, every decode shape run once (``on_progress`` hears how
    far; called on this thread)."""
    started = time.perf_counter()
    if compile:
        log.info("compile cache: %s", use_compile_cache(settings.compile_cache_dir))
    core = EngineCore(loaded, settings, compile=compile, usual_question=picture_question(), steering=steering)
    assert core.runner is not None
    try:
        shapes = warm_up(core.runner, on_progress)
    except Exception as error:
        if not compile:
            raise
        log.warning("compiling the decode step failed, decoding without it: %s", error)
        release_gpu_memory()
        core.recompile(False)
        assert core.runner is not None
        shapes = warm_up(core.runner, on_progress)
    slots, length = core.shape
    log.info(
        "warmed up in %.1f s (%s decoding, %d slot(s) x %d tokens, %d decode shape(s))",
        time.perf_counter() - started,
        "compiled" if core.compile else "eager",
        slots,
        length,
        len(shapes),
    )
    return core


def default_compile_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seebot" / "torch-compile"


def use_compile_cache(directory: str | None) -> Path:
    """Keep torch.compile's artefacts (inductor's FX graph and kernel caches, Triton's
    kernels) in ``directory`` (default: ~/.cache/seebot/torch-compile) rather than /tmp, so
    a restart (or a new container with that folder mounted) finds them. An explicit
    TORCHINDUCTOR_CACHE_DIR in the environment wins."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its /tmp default into the environment the first time it looks: not a choice.
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given == default_cache_dir():
        given = None
    chosen = Path(given or directory or default_compile_cache())
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(chosen)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return chosen
