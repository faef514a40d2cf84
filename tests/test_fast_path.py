"""The fast path (native Phi-3 sharing the remote model's weights) gives the plain path's tokens.

CPU, float32, the tiny model with random weights (unscripted: the native model gets
``inputs_embeds``, so scripted replies would not apply), greedy unless said otherwise.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
    StoppingCriteriaList,
)

from inference import Conversation, Turn, build_prompt
from inference.fast_path import (
    VISION_PREFIX,
    FastPathGenerator,
    FastPathUnavailable,
    build_native_language_model,
    cache_length,
    prompt_embeddings,
)
from inference.jobs import Row
from inference.local_engine import (
    MODEL_INPUTS,
    LocalEngine,
    _BatchStreamer,
    _StopRows,
    default_num_crops,
)
from inference.pieces import TextPieces
from tests.tiny_model import build_tiny_model, copy_with_longrope

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ORIGINAL_MAX = 64  # where the longrope variant switches from short to long factors


def _image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _load(directory: Path) -> SimpleNamespace:
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, torch_dtype=torch.float32, _attn_implementation="eager"
    ).eval()
    tokenizer = processor.tokenizer
    stops = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    return SimpleNamespace(
        directory=directory,
        processor=processor,
        model=model,
        tokenizer=tokenizer,
        stops=stops,
        fast=FastPathGenerator(model, static_cache=True),  # what runs on a GPU
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("fast-path") / "tiny", script=[])


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> SimpleNamespace:
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def longrope(tiny_dir: Path) -> SimpleNamespace:
    """The same weights with Phi-3-vision's rope scaling ("su"), switching at 64 positions."""
    return _load(copy_with_longrope(tiny_dir, tiny_dir.parent / "tiny-longrope", ORIGINAL_MAX))


# --- prompts ---------------------------------------------------------------------------------


def _conversation(images: int, turns: int = 1) -> Conversation:
    """``turns`` user turns (answered but the last), the images spread over them."""
    pictures = [_image(40 + 13 * n, 30 + 7 * n, seed=n) for n in range(images)]
    history: list[Turn] = []
    for turn in range(turns):
        mine = pictures[turn::turns]
        history.append(Turn("user", f"question {turn}: what is the difference in these images?", tuple(mine)))
        if turn < turns - 1:
            history.append(Turn("assistant", f"answer {turn}: the chart shows a red line."))
    return Conversation(tuple(history))


def _encode(tiny: SimpleNamespace, conversation: Conversation) -> dict[str, torch.Tensor]:
    """As LocalEngine._encode does."""
    images = conversation.images
    if images:
        tiny.processor.image_processor.num_crops = default_num_crops(len(images))
    encoded = tiny.processor(build_prompt(conversation), images or None, return_tensors="pt")
    return {name: encoded[name] for name in MODEL_INPUTS if name in encoded}


def _collate(tiny: SimpleNamespace, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LocalEngine's own batching (left padding, images concatenated in row order)."""
    engine = SimpleNamespace(_loaded=SimpleNamespace(tokenizer=tiny.tokenizer))
    return LocalEngine._collate(engine, encoded)  # type: ignore[arg-type]


def _arguments(tiny: SimpleNamespace, **extra: Any) -> dict[str, Any]:
    """What LocalEngine._generate passes besides the inputs (greedy)."""
    return {
        "do_sample": False,
        "eos_token_id": tiny.stops,
        "pad_token_id": tiny.tokenizer.pad_token_id,
        **extra,
    }


def _plain(tiny: SimpleNamespace, inputs: dict[str, torch.Tensor], max_new_tokens: int, **extra: Any) -> list:
    copies = {name: tensor.clone() for name, tensor in inputs.items()}  # the model clamps ids in place
    with torch.inference_mode():
        output = tiny.model.generate(**copies, max_new_tokens=max_new_tokens, **_arguments(tiny, **extra))
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def _fast(tiny: SimpleNamespace, inputs: dict[str, torch.Tensor], max_new_tokens: int, **extra: Any) -> list:
    output = tiny.fast.generate(inputs, max_new_tokens=max_new_tokens, **_arguments(tiny, **extra))
    return output.tolist()


# --- the native model ------------------------------------------------------------------------


def test_native_model_shares_every_weight_tensor(tiny: SimpleNamespace) -> None:
    native = tiny.fast.native
    remote = dict(tiny.model.named_parameters(remove_duplicate=False))
    language = {name for name in tiny.model.state_dict() if not name.startswith(VISION_PREFIX)}
    assert set(native.state_dict()) == language
    for name, parameter in native.named_parameters(remove_duplicate=False):
        assert parameter.data_ptr() == remote[name].data_ptr(), name
        assert parameter is remote[name], name
    assert not any(t.is_meta for t in (*native.parameters(), *native.buffers()))
    assert native.config._attn_implementation == "sdpa"
    assert native.model.rotary_emb.inv_freq.device == native.lm_head.weight.device
    # A second native model over the same remote model costs no weight memory either.
    again = build_native_language_model(tiny.model)
    assert again.lm_head.weight.data_ptr() == tiny.model.lm_head.weight.data_ptr()


def test_prompt_embeddings_leave_the_ids_alone(tiny: SimpleNamespace) -> None:
    inputs = _encode(tiny, _conversation(images=2))
    ids = inputs["input_ids"].clone()
    assert bool((ids < 0).any())
    with torch.inference_mode():
        embeds = prompt_embeddings(tiny.model, inputs)
        reference = tiny.model.model.vision_embed_tokens(
            ids.clone(), pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        )
    assert torch.equal(inputs["input_ids"], ids)
    assert torch.equal(embeds, reference)


# --- same tokens as the plain path -----------------------------------------------------------


@pytest.mark.parametrize(("images", "turns"), [(0, 1), (1, 1), (2, 1), (3, 1), (0, 3), (3, 2)])
def test_alone_same_tokens_as_the_plain_path(tiny: SimpleNamespace, images: int, turns: int) -> None:
    inputs = _encode(tiny, _conversation(images, turns))
    assert _fast(tiny, inputs, 48) == _plain(tiny, inputs, 48)


@pytest.mark.parametrize("shape", [((0, 1), (2, 1)), ((1, 1), (0, 2), (3, 2))])
def test_batched_same_tokens_as_the_plain_path(tiny: SimpleNamespace, shape: tuple) -> None:
    encoded = [_encode(tiny, _conversation(images, turns)) for images, turns in shape]
    lengths = {item["input_ids"].shape[1] for item in encoded}
    assert len(lengths) == len(encoded)  # every row padded differently
    inputs = _collate(tiny, encoded)
    batched = _fast(tiny, inputs, 40)
    assert batched == _plain(tiny, inputs, 40)
    # Each row alone gives its batched tokens too (this is what the bot relies on).
    for row, item in enumerate(encoded):
        assert _fast(tiny, item, 40)[0] == batched[row]


def test_sampling_same_tokens_with_the_same_seed(tiny: SimpleNamespace) -> None:
    inputs = _collate(tiny, [_encode(tiny, _conversation(1)), _encode(tiny, _conversation(0, 2))])
    sampling = {"do_sample": True, "temperature": 0.7}
    torch.manual_seed(7)
    plain = _plain(tiny, inputs, 32, **sampling)
    torch.manual_seed(7)
    assert _fast(tiny, inputs, 32, **sampling) == plain


def _rows(tiny: SimpleNamespace, limits: list[int]) -> tuple[list[Row], list[list[str]]]:
    texts: list[list[str]] = [[] for _ in limits]
    rows = []
    for limit, pieces in zip(limits, texts, strict=True):
        job = SimpleNamespace(cancelled=threading.Event(), send=pieces.append)
        rows.append(Row(job, limit, TextPieces(tiny.tokenizer, job.send)))  # type: ignore[arg-type]
    return rows, texts


def _stream(
    tiny: SimpleNamespace, inputs: dict[str, torch.Tensor], limits: list[int], fast: bool
) -> list[str]:
    """The engine's way: one generate, its _BatchStreamer and _StopRows, per-row limits."""
    rows, texts = _rows(tiny, limits)
    extra = {
        "streamer": _BatchStreamer(rows, tiny.stops),
        "stopping_criteria": StoppingCriteriaList([_StopRows(rows, threading.Event())]),
    }
    (_fast if fast else _plain)(tiny, inputs, max(limits), **extra)
    for row in rows:
        row.finish()
    return ["".join(piece for piece in pieces if isinstance(piece, str)) for pieces in texts]


def test_engine_streamer_sees_the_same_answers(tiny: SimpleNamespace) -> None:
    encoded = [
        _encode(tiny, _conversation(2)),
        _encode(tiny, _conversation(0)),
        _encode(tiny, _conversation(1, 2)),
    ]
    inputs = _collate(tiny, encoded)
    limits = [30, 12, 21]
    fast = _stream(tiny, inputs, limits, fast=True)
    assert fast == _stream(tiny, inputs, limits, fast=False)
    assert all(fast)
    # The prompt is skipped exactly: the text is the decoded new tokens, cut at each limit.
    tokens = _fast(tiny, inputs, max(limits))
    for text, row, limit in zip(fast, tokens, limits, strict=True):
        assert text == tiny.tokenizer.decode(row[:limit], skip_special_tokens=True)


# --- the LongRoPE switch ---------------------------------------------------------------------


def test_longrope_frequencies_match_transformers(longrope: SimpleNamespace) -> None:
    remote = longrope.model.model.rotary_emb
    native = longrope.fast.native.model.rotary_emb
    assert type(native).__name__ == "_LongRopeEmbedding"
    x = torch.zeros(1, dtype=torch.float32)
    for last in (ORIGINAL_MAX - 2, ORIGINAL_MAX - 1, ORIGINAL_MAX, ORIGINAL_MAX + 40):
        positions = torch.tensor([[1, 1, *range(last - 5, last + 1)], list(range(last - 7, last + 1))])
        for expected, got in zip(remote(x, positions), native(x, positions), strict=True):
            assert torch.equal(expected, got), last
    below = native(x, torch.tensor([[ORIGINAL_MAX - 1]]))[0]
    above = native(x, torch.arange(ORIGINAL_MAX + 1)[None, :])[0][:, ORIGINAL_MAX - 1 : ORIGINAL_MAX]
    assert not torch.equal(below, above)  # the same position rotates differently past the switch


def test_longrope_same_tokens_across_the_switch(longrope: SimpleNamespace) -> None:
    short = _encode(longrope, Conversation.single("hi"))
    long = _encode(
        longrope,
        Conversation(
            (Turn("user", "a", (_image(20, 16, 1),)), Turn("assistant", "b"), Turn("user", "what now?"))
        ),
    )
    for item in (short, long):
        assert item["input_ids"].shape[1] < ORIGINAL_MAX
    new_tokens = 80
    assert long["input_ids"].shape[1] + new_tokens > ORIGINAL_MAX + 20
    for item in (short, long):
        assert _fast(longrope, item, new_tokens) == _plain(longrope, item, new_tokens)
    # Batched, each row gets its tokens alone: the fast path picks the factors per row (the
    # plain path picks them over the whole batch, so its batched rows may differ from alone).
    inputs = _collate(longrope, [short, long])
    batched = _fast(longrope, inputs, new_tokens)
    for row, item in enumerate((short, long)):
        assert batched[row] == _plain(longrope, item, new_tokens)[0]


def test_longrope_prompt_already_past_the_switch(longrope: SimpleNamespace) -> None:
    inputs = _encode(longrope, _conversation(3, 2))
    assert inputs["input_ids"].shape[1] > ORIGINAL_MAX
    assert _fast(longrope, inputs, 24) == _plain(longrope, inputs, 24)


def test_decode_step_traces_as_one_graph_across_the_switch(longrope: SimpleNamespace) -> None:
    """What CUDA graphs need: no graph break in the decode step, the LongRoPE switch included
    (transformers' own longrope embedding breaks here). Dynamo only: no inductor, no graphs."""
    native = longrope.fast.native
    inputs = _collate(longrope, [_encode(longrope, _conversation(0)), _encode(longrope, _conversation(1))])
    rows, prompt_length = inputs["input_ids"].shape
    steps = ORIGINAL_MAX - prompt_length + 8
    assert steps > 8
    expected = _fast(longrope, inputs, steps)
    compiled = torch.compile(native.__call__, fullgraph=True, backend="eager")
    try:
        with torch.inference_mode():
            embeds = prompt_embeddings(longrope.model, inputs)
            cache = StaticCache(config=native.config, max_batch_size=rows, max_cache_len=cache_length(0, 1))
            ids = torch.empty(rows, 0, dtype=torch.long)
            mask, position = inputs["attention_mask"], torch.arange(prompt_length)
            for step in range(steps):  # as generate's _sample does it: eager prefill, then decode
                model_inputs = native.prepare_inputs_for_generation(
                    ids, cache, mask, embeds, position, use_cache=True, num_logits_to_keep=1
                )
                output = (native if step == 0 else compiled)(**model_inputs, return_dict=True)
                ids = torch.cat([ids, output.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                position = position[-1:] + 1
    finally:
        torch._dynamo.reset()
    assert ids.tolist() == expected


# --- caches, compile, refusals ---------------------------------------------------------------


def test_static_cache_is_bucketed_and_reused(tiny: SimpleNamespace) -> None:
    assert cache_length(10, 20) == 256
    assert cache_length(250, 6) == 256
    assert cache_length(250, 7) == 512
    assert cache_length(10, 20, bucket=1) == 30
    fast = FastPathGenerator(tiny.model, cached=1, static_cache=True)
    inputs = _encode(tiny, _conversation(1))
    first = _fast(SimpleNamespace(**{**vars(tiny), "fast": fast}), inputs, 20)
    (cache,) = fast._caches.values()
    assert cache.max_cache_len == 256
    second = _fast(SimpleNamespace(**{**vars(tiny), "fast": fast}), inputs, 30)
    assert list(fast._caches.values()) == [cache]  # reset and used again
    assert second[0][:20] == first[0]
    fast.release()
    assert not fast._caches


def test_compile_is_never_used_on_the_cpu(tiny: SimpleNamespace) -> None:
    fast = FastPathGenerator(tiny.model, compile=True)
    assert fast.compile is False
    assert fast.native.compile_decode is False
    assert fast.native.get_compiled_call(None) == fast.native.__call__


def test_on_the_cpu_the_dynamic_cache_gives_the_same_tokens(tiny: SimpleNamespace) -> None:
    fast = FastPathGenerator(tiny.model)
    assert fast.static_cache is False  # the default on the CPU
    for inputs in (
        _encode(tiny, _conversation(2)),
        _collate(tiny, [_encode(tiny, _conversation(3, 2)), _encode(tiny, _conversation(0))]),
    ):
        output = fast.generate(inputs, max_new_tokens=30, **_arguments(tiny))
        assert output.tolist() == _plain(tiny, inputs, 30)
    assert not fast._caches


def _one_line(error: pytest.ExceptionInfo[FastPathUnavailable]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_a_model_without_the_phi3_vision_modules_is_refused() -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(FastPathUnavailable) as error:
        build_native_language_model(LlamaForCausalLM(config))
    assert "vision_embed_tokens" in _one_line(error)
    with pytest.raises(FastPathUnavailable) as error:
        build_native_language_model(torch.nn.Linear(2, 2))
    assert "not a Phi-3-vision model" in _one_line(error)


def test_other_module_names_are_refused(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True, torch_dtype=torch.float32)
    attention = model.model.layers[0].self_attn
    attention.q_proj = attention.qkv_proj  # a split projection under another name
    del attention.qkv_proj
    with pytest.raises(FastPathUnavailable) as error:
        build_native_language_model(model)
    assert "layers.0.self_attn.qkv_proj" in _one_line(error)


def test_shape_mismatch_and_unknown_rope_are_refused(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.config.intermediate_size *= 2
    with pytest.raises(FastPathUnavailable) as error:
        build_native_language_model(model)
    assert "size mismatch" in _one_line(error)
    model.config.intermediate_size //= 2
    half_head = model.config.hidden_size // model.config.num_attention_heads // 2
    model.config.rope_scaling = {
        "type": "yarn",
        "short_factor": [1.0] * half_head,
        "long_factor": [1.0] * half_head,
    }
    with pytest.raises(FastPathUnavailable) as error:
        build_native_language_model(model)
    assert "yarn" in _one_line(error)
