"""The model every measurement uses, the picture it is asked about, and how one request is timed.

By default the tiny native Phi-3-vision of ``tests.tiny_model`` is built into a temp dir: for
the generate-vs-engine section with the real processor's numbers (336-pixel crops, 144
features per crop: a 1280x720 picture at 16 crops is a 2,380-token prompt with its question,
as with the real model), for the others with tiny crops. Its engines get one scripted rule
(``tests.scripted``, steering the real model's token choice): `OVERHEAD_QUESTION` is answered
with `OVERHEAD_REPLY`, sleeping so that the whole answer takes `SCRIPTED_SECONDS`. Any other
question gets the random weights' clean text until ``max_new_tokens`` (it never stops early),
so compute per token is real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from inference import Conversation, GenerationRequest, InferenceSettings
from inference.local_engine import LocalEngine

log = logging.getLogger(__name__)

OVERHEAD_QUESTION = "benchmark: what does this chart show, in about two seconds?"
OVERHEAD_REPLY = (
    "The chart shows sales by quarter. The fourth quarter is the highest, "
    "the first quarter is the lowest, and the third is a little below the second."
)
SCRIPTED_SECONDS = 2.0
# Questions for a real model (no script): short answers, the same for engine and bot.
REAL_MODEL_QUESTION = "What does this chart show? Answer in two sentences."


@dataclass(frozen=True)
class BenchModel:
    model_id: str
    device: str
    tiny: bool
    # Tiny model only: forward passes of the scripted reply (its tokens + <|end|>), each sleeping.
    scripted_steps: int | None = None
    seconds_per_token: float | None = None
    script: tuple[dict[str, Any], ...] = ()  # tests.scripted rules for its engines (tiny model)

    @property
    def overhead_question(self) -> str:
        return OVERHEAD_QUESTION if self.tiny else REAL_MODEL_QUESTION

    def settings(self, **changes: Any) -> InferenceSettings:
        """Engine settings for this model; ``changes`` go through `dataclasses.replace`."""
        base = InferenceSettings(model_id=self.model_id, device=self.device)
        return dataclasses.replace(base, **changes)

    def steering(self) -> Any:
        """The scripted replies' steering for this model's engines (None: no script)."""
        if not self.script:
            return None
        from tests.scripted import ScriptedReplies

        return ScriptedReplies(list(self.script), self.model_id)


def build_tiny(directory: Path, device: str, *, real_image_shapes: bool = False) -> BenchModel:
    """Build the tiny model and the overhead rule, timed so the reply takes SCRIPTED_SECONDS.

    ``real_image_shapes``: the real processor's numbers (a 1280x720 picture at 16 crops is a
    2,380-token prompt), for the generate-vs-engine section; else tiny crops (a picture is a
    few dozen tokens), so that the other sections measure the bot and batching, not prefill.
    """
    from tests.tiny_model import build_tiny_model
    from tests.tiny_model.builder import build_tokenizer

    tokenizer = build_tokenizer()  # deterministic: the same one the model directory gets
    reply_tokens = len(tokenizer.backend_tokenizer.encode(OVERHEAD_REPLY, add_special_tokens=False).ids)
    steps = reply_tokens + 1  # every forward up to and including the one that says <|end|> sleeps
    seconds_per_token = SCRIPTED_SECONDS / steps
    rule = {"when": OVERHEAD_QUESTION, "reply": OVERHEAD_REPLY, "seconds_per_token": seconds_per_token}
    started = time.perf_counter()
    build_tiny_model(directory, real_image_shapes=real_image_shapes)
    log.info(
        "built the tiny model in %.1f s at %s (scripted reply: %d steps x %.3f s)",
        time.perf_counter() - started,
        directory,
        steps,
        seconds_per_token,
    )
    return BenchModel(str(directory), device, True, steps, seconds_per_token, (rule,))


def chart_image() -> Image.Image:
    """A small bar chart (320x240), drawn offline."""
    from tests.synthetic_images import bar_chart

    return bar_chart()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def running_engine(
    settings: InferenceSettings, steering: Any = None, **kwargs: Any
) -> AsyncIterator[LocalEngine]:
    """A started engine; ``steering``: see inference/steering.py; ``kwargs`` go to LocalEngine."""
    engine = LocalEngine(settings, steering=steering, **kwargs)
    started = time.perf_counter()
    await engine.start()
    log.info(
        "engine ready in %.1f s (max_batch_size=%d)", time.perf_counter() - started, settings.max_batch_size
    )
    try:
        yield engine
    finally:
        await engine.close()


@dataclass(frozen=True)
class Timed:
    """One request through an engine, in `time.perf_counter` seconds."""

    started: float
    first_piece: float | None
    ended: float
    text: str

    @property
    def total(self) -> float:
        return self.ended - self.started

    @property
    def to_first_piece(self) -> float | None:
        return None if self.first_piece is None else self.first_piece - self.started


async def timed_request(engine: LocalEngine, request: GenerationRequest) -> Timed:
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    async for piece in engine.stream(request):
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
    return Timed(started, first, time.perf_counter(), "".join(pieces))


def question(text: str, image: Image.Image, max_new_tokens: int | None = None) -> GenerationRequest:
    return GenerationRequest(Conversation.single(text, [image]), max_new_tokens=max_new_tokens)
