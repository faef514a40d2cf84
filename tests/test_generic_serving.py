"""Another vision model (the generic path) behind the same engine front: each request gets
the answer ``generate`` gives it alone, alone and in a batch, and a prompt too long is told."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference import Conversation, GenerationRequest, InferenceSettings
from inference.engine import PromptTooLong
from inference.generic import encode_generic
from inference.local_engine import LocalEngine
from tests.tiny_vlm import build_tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def ask(question: str, images: int, max_new_tokens: int, ends: list[str] | None = None) -> GenerationRequest:
    pictures = [Image.new("RGB", (40 + 9 * n, 30), (50 * n, 100, 150)) for n in range(images)]
    on_end = None if ends is None else ends.append
    conversation = Conversation.single(question, pictures)
    return GenerationRequest(conversation, max_new_tokens=max_new_tokens, on_end=on_end)


def generate_alone(engine: LocalEngine, request: GenerationRequest) -> tuple[str, str]:
    """The answer ``generate`` gives alone, and why it ended ("length": no stop token)."""
    loaded = engine.loaded
    assert loaded is not None
    inputs = encode_generic(loaded.processor, request.conversation)
    with torch.inference_mode():
        output = loaded.model.generate(
            **inputs,
            max_new_tokens=request.max_new_tokens,
            do_sample=False,
            eos_token_id=loaded.stop_token_ids,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    said = output[0, inputs["input_ids"].shape[1] :].tolist()
    new = [t for t in said if t not in loaded.stop_token_ids]
    why = "stop" if len(new) < len(said) else "length"
    return loaded.tokenizer.decode(new, skip_special_tokens=True), why


async def answer(engine: LocalEngine, request: GenerationRequest) -> str:
    return "".join([piece async for piece in engine.stream(request)])


async def test_the_generic_path_behind_the_engine_front(llava_dir: Path) -> None:
    settings = InferenceSettings(model_id=str(llava_dir), device="cpu", dtype="float32", max_new_tokens=12)
    engine = LocalEngine(settings)
    await engine.start()
    try:
        assert engine.decoding == "generic"
        ends: list[str] = []
        asked = [
            ask("What is this?", 1, 8, ends),
            ask("Tell me more about it", 1, 5, ends),
            ask("hi", 0, 6, ends),
        ]
        alone = [generate_alone(engine, request) for request in asked]
        expected, why = [text for text, _ in alone], [reason for _, reason in alone]
        assert [await answer(engine, request) for request in asked] == expected
        assert ends == why  # each says why it ended: its own limit, or a stop token
        together = await asyncio.gather(*(answer(engine, request) for request in asked))
        assert list(together) == expected
        assert sorted(ends[3:]) == sorted(why)
        with pytest.raises(PromptTooLong):  # more than the model's context
            await answer(engine, ask("What is this?", 1, 10**6))
    finally:
        await engine.close()
