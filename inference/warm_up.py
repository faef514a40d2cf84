"""The fast path's warm-up: run it once per common cache shape before the first question.

With COMPILE on CUDA, the first decode step of a new (slots, length) shape compiles it and
records its CUDA graphs: tens of seconds for a 4B model the first time (seconds once the
compiled kernels are in the on-disk cache, see ``use_compile_cache``). Paying that at
start-up, on the worker thread while the bot connects and tells early askers it is still
starting, means no question waits for it. The shapes warmed are those of a text-only
question and of a question about one 16:9 picture at the default number of crops, each with
MAX_NEW_TOKENS to answer: the shapes most questions get. Eager (no compile), only the
text-only question runs: it checks the fast path works with this model (else the engine
falls back to the plain path before taking questions) and sets up the KV cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .continuous import SlotDecoder
from .conversation import Conversation

WARM_UP_QUESTION = "Describe this picture."
WARM_UP_PICTURE_SIZE = (1280, 720)
# torch.compile(mode="reduce-overhead"): the 1st call compiles, CUDA graphs are recorded on a
# later one; a few steps make sure the first real question replays them.
WARM_UP_STEPS = 3


def warm_up_conversations(*, with_picture: bool) -> list[Conversation]:
    """A text-only question, and (``with_picture``: when compiling, where a shape not warmed
    costs a compile) a question about one picture, whose image encoder costs real time."""
    conversations = [Conversation.single(WARM_UP_QUESTION)]
    if with_picture:
        picture = Image.new("RGB", WARM_UP_PICTURE_SIZE, (128, 128, 128))
        conversations.append(Conversation.single(WARM_UP_QUESTION, [picture]))
    return conversations


def warm_up(
    decoder: SlotDecoder, prompts: list[dict[str, torch.Tensor]], max_new_tokens: int
) -> list[tuple[int, int]]:
    """Prefill each prompt into slot 0 and decode a few steps, once per distinct cache shape;
    returns the shapes warmed. The slot is freed afterwards."""
    shapes: list[tuple[int, int]] = []
    for inputs in prompts:
        shape = decoder.shape_for(inputs["input_ids"].shape[1] + max_new_tokens)
        if shape in shapes:
            continue
        decoder.ensure(*shape)
        try:
            token = int(decoder.prefill_many([(0, inputs)])[0].argmax())
            for _ in range(WARM_UP_STEPS):
                token = int(decoder.step({0: token})[0].argmax())
        finally:
            decoder.free(0)
        shapes.append(shape)
    return shapes


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
