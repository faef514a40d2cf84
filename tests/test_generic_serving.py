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


def ask(question: str, images: int, max_new_tokens: int) -> GenerationRequest:
    pictures = [Image.new("RGB", (40 + 9 * n, 30), (50 * n, 100, 150)) for n in range(images)]
    return GenerationRequest(Conversation.single(question, pictures), max_new_tokens=max_new_tokens)


def generate_alone(engine: LocalEngine, request: GenerationRequest) -> str:
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
    new = [t for t in output[0, inputs["input_ids"].shape[1] :].tolist() if t not in loaded.stop_token_ids]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


async def answer(engine: LocalEngine, request: GenerationRequest) -> str:
    return "".join([piece async for piece in engine.stream(request)])


async def test_the_generic_path_behind_the_engine_front(llava_dir: Path) -> None:
    settings = InferenceSettings(model_id=str(llava_dir), device="cpu", dtype="float32", max_new_tokens=12)
    engine = LocalEngine(settings)
    await engine.start()
    try:
        assert engine.decoding == "generic"
        asked = [ask("What is this?", 1, 8), ask("Tell me more about it", 1, 5), ask("hi", 0, 6)]
        expected = [generate_alone(engine, request) for request in asked]
        assert [await answer(engine, request) for request in asked] == expected
        together = await asyncio.gather(*(answer(engine, request) for request in asked))
        assert list(together) == expected
        with pytest.raises(PromptTooLong):  # more than the model's context
            await answer(engine, ask("What is this?", 1, 10**6))
    finally:
        await engine.close()
