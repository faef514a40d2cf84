"""QUANTIZE=8bit / 4bit on the CPU (bitsandbytes' CPU backend), on the tiny native model and a
tiny LLaVA (the generic path): the weights really are quantized where they should be, and the
CLI and the engine answer, stream and stop as with full-precision weights."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image

from inference import Conversation, GenerationRequest, InferenceSettings, build_prompt
from inference.loading import LoadedModel, load_model
from inference.local_engine import LocalEngine, compile_wanted
from inference.memory import weight_bytes
from inference.prompt_inputs import default_num_crops
from inference.settings import SettingsError
from tests.bot_process import new_channel, png, start_bot, stop
from tests.conftest import SCRIPT
from tests.fake_discord import FakeDiscord
from tests.scripted import ScriptedReplies
from tests.synthetic_images import save_all
from tests.test_cli import ROOT, noise, run_cli
from tests.tiny_vlm import build_tiny_llava

MODES = ["8bit", "4bit"]
BNB_LINEAR = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}


def settings_for(model_dir: Path, mode: str, **changes: object) -> InferenceSettings:
    return replace(InferenceSettings(model_id=str(model_dir), device="cpu", quantize=mode), **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def full_precision(tiny_model_dir: Path) -> LoadedModel:
    return load_model(settings_for(tiny_model_dir, "none"))


@pytest.fixture(scope="module", params=MODES)
def quantized(request: pytest.FixtureRequest, tiny_model_dir: Path) -> LoadedModel:
    return load_model(settings_for(tiny_model_dir, request.param))


def linears(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
    }


def test_the_language_models_linear_layers_are_bitsandbytes_and_the_rest_stays_in_the_dtype(
    quantized: LoadedModel, full_precision: LoadedModel
) -> None:
    model = quantized.model
    mode = "8bit" if getattr(model, "is_loaded_in_8bit", False) else "4bit"
    language = linears(model, "model.layers.")
    assert language and all(isinstance(m, BNB_LINEAR[mode]) for m in language.values()), language
    vision = linears(model, "model.vision_embed_tokens.")
    assert vision and all(type(m) is torch.nn.Linear for m in vision.values())
    assert all(m.weight.dtype == torch.float32 for m in vision.values())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert weight_bytes(model) < 0.8 * weight_bytes(full_precision.model)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_all(tmp_path_factory.mktemp("pictures"))


def quantized_generate(loaded: LoadedModel, question: str, images: list[Image.Image], tokens: int) -> str:
    """HF generate's greedy answer on the quantized model, for the prompt the CLI builds."""
    loaded.processor.image_processor.num_crops = default_num_crops(len(images))
    inputs = loaded.processor(build_prompt(Conversation.single(question, images)), images or None)
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=loaded.stop_token_ids
        )
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("mode", MODES)
def test_the_cli_answers_with_quantized_weights_as_hf_generate_and_prints_nothing_else(
    mode: str, pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    question = "What is shown in this chart?"
    result = run_cli(
        str(pictures["chart.png"]),
        "--question",
        question,
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--max-new-tokens",
        "8",
        cwd=tmp_path,
        env={"QUANTIZE": mode},
    )
    assert result.returncode == 0, result.stderr
    assert noise(result.stderr) == []
    loaded = load_model(settings_for(tiny_model_dir, mode))
    image = Image.open(pictures["chart.png"]).convert("RGB")
    expected = quantized_generate(loaded, question, [image], 8)
    assert expected.strip() and result.stdout.strip() == expected.strip()


def ask(text: str, **kwargs: object) -> GenerationRequest:
    picture = Image.new("RGB", (64, 48), "red")
    return GenerationRequest(Conversation.single(text, [picture]), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
async def test_the_engine_streams_and_stops_with_quantized_weights(mode: str, tiny_model_dir: Path) -> None:
    settings = settings_for(tiny_model_dir, mode, max_new_tokens=32)
    engine = LocalEngine(settings, steering=ScriptedReplies(SCRIPT, tiny_model_dir))
    await engine.start()
    try:
        hello = [piece async for piece in engine.stream(ask("Say hello"))]
        assert "".join(hello) == "Hello there, my friend! How are you today?"  # ended by <|end|>
        assert len(hello) > 1
        limited = "".join([piece async for piece in engine.stream(ask("ramble on", max_new_tokens=5))])
        tokenizer = engine.loaded.tokenizer  # type: ignore[union-attr]
        assert limited and len(tokenizer(limited, add_special_tokens=False).input_ids) <= 6
        assert engine.decoding == "eager"
    finally:
        await engine.close()


async def test_the_bot_answers_with_4bit_weights_and_the_answer_ends_on_its_own(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(fake, tiny_model_dir, tmp_path, QUANTIZE="4bit", MAX_NEW_TOKENS="64")
        try:
            question = await fake.send_message(
                fake.alice,
                await new_channel(fake, "quantized"),
                "Say hello",
                attachments=[png(Image.new("RGB", (64, 48), "red"))],
                mention_bot=True,
            )
            # The answer is finished when its Cancel button is taken off.
            answer = await fake.wait_for(
                lambda: next(
                    (m for m in fake.bot_messages_in(int(question["id"])) if m["components"] == []), None
                ),
                timeout=30,
                description="a finished answer",
            )
            assert answer["content"] == "Hello there, my friend! How are you today?"
            assert "nf4 weights" in bot.log
            assert "bitsandbytes" not in bot.log and "MatMul8bitLt" not in bot.log
        finally:
            await stop(bot)


def test_without_bitsandbytes_the_start_is_one_clear_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import bitsandbytes` fail as if it were not installed.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from inference.cli import main\n"
        f"sys.exit(main(['--question', 'hi', '--model', {str(tiny_model_dir)!r}, '--device', 'cpu']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**run_env(), "QUANTIZE": "4bit"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert noise(result.stderr) == [
        "error: QUANTIZE=4bit needs bitsandbytes, which is not installed: "
        "install it with pip install -e '.[quant]', or set QUANTIZE=none"
    ]


def run_env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_quantize_takes_only_its_three_values() -> None:
    assert InferenceSettings.from_env({"QUANTIZE": "4BIT"}).quantize == "4bit"
    assert InferenceSettings.from_env({}).quantize == "none"
    with pytest.raises(SettingsError, match="QUANTIZE must be one of none, 8bit, 4bit"):
        InferenceSettings.from_env({"QUANTIZE": "int4"})


def test_int8_weights_decode_eagerly_on_cuda_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    on = InferenceSettings(compile="on")
    with caplog.at_level(logging.INFO, logger="inference.local_engine"):
        assert compile_wanted(replace(on, quantize="8bit"), "cuda") is False
    assert [r.getMessage() for r in caplog.records if "COMPILE" in r.getMessage()] == [
        "COMPILE: decoding eagerly: int8 layers (QUANTIZE=8bit) choose their outlier columns at every "
        "step, which CUDA graphs cannot replay"
    ]
    assert compile_wanted(replace(on, quantize="4bit"), "cuda") is True
    assert compile_wanted(replace(on, quantize="8bit"), "cpu") is True
    assert compile_wanted(replace(on, quantize="8bit", compile="auto"), "cpu") is False


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.mark.parametrize("mode", MODES)
async def test_the_generic_path_quantizes_the_language_model_only(mode: str, llava_dir: Path) -> None:
    # 4-bit only loads here: the tiny LLaVA's 32-wide layers are narrower than one nf4 block
    # (64), which bitsandbytes' CPU kernel cannot run; real models are thousands wide.
    engine = LocalEngine(settings_for(llava_dir, mode, max_new_tokens=4))
    await engine.start()
    try:
        model = engine.loaded.model  # type: ignore[union-attr]
        language = linears(model, "model.language_model.")
        assert language and all(isinstance(m, BNB_LINEAR[mode]) for m in language.values())
        kept = {
            name: m for name, m in linears(model, "").items() if not name.startswith("model.language_model.")
        }
        assert any("vision_tower" in n for n in kept) and any("multi_modal_projector" in n for n in kept)
        assert "lm_head" in kept and all(type(m) is torch.nn.Linear for m in kept.values())
        assert all(m.weight.dtype == torch.float32 for m in kept.values())
        if mode == "8bit":
            pieces = [piece async for piece in engine.stream(ask("What is this?"))]
            assert "".join(pieces).strip()
    finally:
        await engine.close()


def test_the_which_gpu_table_comes_from_the_real_shapes() -> None:
    from bench.quant import memory_table

    table = memory_table()
    assert round(table["parameters"] / 1e9, 2) == 4.15
    assert table["kv_bytes_per_token"] == 384 * 1024 and table["slot_tokens"] == 3584
    rows = {row["mode"]: row for row in table["rows"]}
    assert 2.9e9 < rows["4bit"]["weight_bytes"] < 3.2e9  # "about 3 GB"
    assert round(rows["none"]["weight_bytes"] / 1e9, 1) == 8.3
    # README: an 8 GB GPU answers two one-image questions at once with QUANTIZE=4bit.
    assert rows["4bit"]["questions_fit"]["8"] == 2 and rows["none"]["questions_fit"]["8"] == 0


def test_a_device_bitsandbytes_does_not_run_on_is_one_clear_line() -> None:
    from inference.engine import ModelLoadError
    from inference.quantization import PHI3V_KEPT, quantization_config

    with pytest.raises(ModelLoadError) as caught:
        quantization_config("8bit", torch.device("meta"), torch.float32, PHI3V_KEPT)
    assert str(caught.value).startswith("QUANTIZE=8bit: bitsandbytes does not run on meta (it runs on ")
    assert str(caught.value).endswith("set QUANTIZE=none") and "\n" not in str(caught.value)
    assert quantization_config("none", torch.device("meta"), torch.float32, PHI3V_KEPT) is None
