"""The tiny Phi-3-vision look-alike loads and behaves like the hub model where tests rely on it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.tiny_model import build_tiny_model, num_image_tokens

# conftest.py already points HF_HOME (where remote code is copied) at a temp dir, goes
# offline and uses one torch thread.
torch.set_num_threads(1)

LONG_REPLY_CHARS = 5000
MEDIUM_REPLY = (
    "Sure!  Here is the **difference** between the two images:\n\n"
    "- The first photo shows a team;\tthe second a book.\n"
    "- Text: `ALONE` (Morgan & Maxwell) — ünïcode ✓ 🎉\n\n"
    "```python\n"
    "def compare(a, b):\n"
    "    print(a != b)  # {not a placeholder}\n"
    "```\n"
    "Hey @everyone, trailing spaces   \n"
)
SCRIPT = [
    {"when": "show me the code", "reply": MEDIUM_REPLY},
    {
        "when": "count the images",
        "reply": "I was given {images} image(s) and asked: {question}",
        "after_end": "\n<|assistant|>\nand then I kept talking",
    },
    {"when": "slowly", "reply": "one two three four five", "seconds_per_token": 0.02},
]


def _long_reply() -> str:
    paragraph = (
        "The chart compares the book sales of each team over the year; Morgan and Maxwell "
        "lead, everyone else is far behind. "
    )
    code = "```python\ndef total(values):\n    print(sum(values))\n    return sum(values)\n```\n"
    text, part = "", 0
    while len(text) < LONG_REPLY_CHARS:
        part += 1
        text += f"## Part {part}\n\n{paragraph * 3}\n\n"
        text += code if part % 3 == 0 else "- **note**: @everyone look at the photo!\n\n"
    return text[:LONG_REPLY_CHARS]


def _prompt(question: str, images: int = 0) -> str:
    tags = "".join(f"<|image_{n}|>\n" for n in range(1, images + 1))
    return f"<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


def _image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoProcessor, TextIteratorStreamer

        script = [*SCRIPT, {"when": "say something long", "reply": _long_reply()}]
        directory = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-phi3-v", script=script)
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            trust_remote_code=True,
            torch_dtype=torch.float32,
            _attn_implementation="eager",
        )
        tokenizer = processor.tokenizer
        yield SimpleNamespace(
            directory=directory,
            processor=processor,
            model=model,
            tokenizer=tokenizer,
            end_id=tokenizer.convert_tokens_to_ids("<|end|>"),
            eos_id=tokenizer.eos_token_id,
            AutoModelForCausalLM=AutoModelForCausalLM,
            TextIteratorStreamer=TextIteratorStreamer,
        )


def _copy(inputs) -> dict:
    # The image embedder clamps input_ids in place (as the hub model does): never reuse them.
    return {key: value.clone() for key, value in inputs.items()}


def _generate(tiny, inputs, *, model=None, **kwargs) -> list[int]:
    inputs = _copy(inputs)
    kwargs.setdefault("eos_token_id", [tiny.end_id, tiny.eos_id])
    kwargs.setdefault("do_sample", False)
    output = (model or tiny.model).generate(**inputs, **kwargs)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _stream(tiny, inputs, *, model=None, **kwargs) -> tuple[str, list[int]]:
    """Generate on a thread as the engine does; return the streamed text and the new ids."""
    streamer = tiny.TextIteratorStreamer(
        tiny.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60
    )
    result: dict = {}

    def run() -> None:
        try:
            result["ids"] = _generate(tiny, inputs, model=model, streamer=streamer, **kwargs)
        except BaseException as error:  # surfaced below; the streamer would wait otherwise
            result["error"] = error
            streamer.end()

    worker = threading.Thread(target=run)
    worker.start()
    text = "".join(streamer)
    worker.join()
    if "error" in result:
        raise result["error"]
    return text, result["ids"]


def test_build_is_fast_and_deterministic(tiny, tmp_path):
    started = time.perf_counter()
    other = build_tiny_model(tmp_path / "again", script=[*SCRIPT])
    assert time.perf_counter() - started < 5
    for name in ("tokenizer.json", "model.safetensors", "preprocessor_config.json"):
        assert (other / name).read_bytes() == (tiny.directory / name).read_bytes(), name


def test_loads_through_the_hub_code_path(tiny):
    processor, model, tokenizer = tiny.processor, tiny.model, tiny.tokenizer
    assert type(processor).__name__ == "TinyPhi3VProcessor"
    assert type(processor.image_processor).__name__ == "TinyPhi3VImageProcessor"
    assert processor.image_processor.num_crops == 16
    assert type(model).__module__.startswith("transformers_modules.")
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.float32
    assert len(tokenizer) <= model.config.vocab_size
    names = set(model.state_dict())
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.qkv_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert name in names
    # Special tokens as in the hub tokenizer; <s> is added like Llama's.
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<s>"
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    for token in ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|image|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert (
            tokenizer(f"a{token}b", add_special_tokens=False).input_ids.count(
                tokenizer.convert_tokens_to_ids(token)
            )
            == 1
        )
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nhi<|end|>\n<|assistant|>\n"
    )


@pytest.mark.parametrize("dtype", ["auto", torch.bfloat16])
def test_loads_with_other_dtypes(tiny, dtype):
    model = tiny.AutoModelForCausalLM.from_pretrained(
        tiny.directory, trust_remote_code=True, torch_dtype=dtype
    )
    assert model.dtype == (torch.float32 if dtype == "auto" else dtype)
    inputs = tiny.processor(_prompt("what is it?", 1), [_image(40, 30, 1)], return_tensors="pt")
    assert len(_generate(tiny, inputs, model=model, max_new_tokens=8)) == 8
    inputs = tiny.processor(_prompt("show me the code"), None)
    text, _ = _stream(tiny, inputs, model=model, max_new_tokens=300)
    assert text == MEDIUM_REPLY


@pytest.mark.parametrize("text", [MEDIUM_REPLY, _long_reply(), "  leading\n\n\ttabs  ", "a.b , c ."])
def test_tokenizer_round_trips_text(tiny, text):
    ids = tiny.tokenizer(text, add_special_tokens=False).input_ids
    assert tiny.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_image_placeholders_are_negative_ids(tiny):
    images = [_image(1280, 720, 1), _image(300, 900, 2)]
    inputs = tiny.processor(_prompt("compare", 2), images, return_tensors="pt")
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and inputs["attention_mask"].shape == ids.shape
    assert int((ids == -1).sum()) == num_image_tokens(1280, 720, 16) == 37
    assert int((ids == -2).sum()) == num_image_tokens(300, 900, 16) == 34
    assert int((ids < -2).sum()) == 0
    first_two = ids[0][ids[0] < 0].unique_consecutive().tolist()
    assert first_two == [-1, -2]  # one run each, in order
    assert tuple(inputs["pixel_values"].shape) == (2, 17, 3, 16, 16)
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["image_sizes"].tolist() == [[48, 80], [96, 32]]
    # A grayscale image is converted to RGB.
    gray = tiny.processor(_prompt("?", 1), [Image.new("L", (20, 20), 7)], return_tensors="pt")
    assert gray["pixel_values"].shape[2] == 3


def test_num_crops_changes_the_token_count(tiny):
    image = _image(1280, 720, 3)
    image_processor = tiny.processor.image_processor
    counts = {}
    try:
        for crops in (4, 16):
            image_processor.num_crops = crops
            inputs = tiny.processor(_prompt("what?", 1), [image], return_tensors="pt")
            counts[crops] = int((inputs["input_ids"] == -1).sum())
            assert inputs["pixel_values"].shape[1] == crops + 1
    finally:
        image_processor.num_crops = 16
    assert counts == {4: 14, 16: 37}
    assert image_processor.calc_num_image_tokens_from_image_size(1280, 720) == 37


@pytest.mark.parametrize(
    ("tags", "images"),
    [((1, 3), 2), ((1,), 2), ((1, 2), 1), ((), 1), ((2,), 1)],
)
def test_mismatched_image_tags_raise(tiny, tags, images):
    prompt = "<|user|>\n" + "".join(f"<|image_{n}|>\n" for n in tags) + "hi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError):
        tiny.processor(prompt, [_image(32, 32, n) for n in range(images)], return_tensors="pt")


def test_text_only_prompt_is_plain_tokenizer_output(tiny):
    prompt = _prompt("hello there")
    inputs = tiny.processor(prompt, None, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"][0].tolist() == tiny.tokenizer(prompt).input_ids


def test_greedy_is_deterministic_and_images_matter(tiny):
    prompt = _prompt("What is in this image?", 1)
    first = tiny.processor(prompt, [_image(64, 48, 10)], return_tensors="pt")
    other = tiny.processor(prompt, [_image(64, 48, 11)], return_tensors="pt")
    tokens = _generate(tiny, first, max_new_tokens=16)
    assert len(tokens) == 16
    assert _generate(tiny, first, max_new_tokens=16) == tokens
    assert _generate(tiny, other, max_new_tokens=16) != tokens
    with torch.no_grad():
        logits_first = tiny.model(**_copy(first)).logits[0, -1]
        logits_other = tiny.model(**_copy(other)).logits[0, -1]
    assert (logits_first - logits_other).abs().max() > 1e-3


def test_input_ids_lose_their_images_in_place(tiny):
    inputs = tiny.processor(_prompt("what?", 1), [_image(32, 32, 4)], return_tensors="pt")
    ids = inputs["input_ids"]
    assert int((ids < 0).sum()) > 0
    tiny.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert int((ids < 0).sum()) == 0  # like the hub model: copy before reusing input_ids


def test_placeholders_must_match_the_images(tiny):
    inputs = tiny.processor(_prompt("what?", 1), [_image(32, 32, 8)])
    two = tiny.processor(_prompt("what?", 2), [_image(32, 32, 8), _image(16, 48, 9)])
    broken = [
        {**_copy(inputs), "pixel_values": two["pixel_values"], "image_sizes": two["image_sizes"]},
        {**_copy(inputs), "image_sizes": two["image_sizes"][1:]},
        {key: value.clone() for key, value in inputs.items() if key != "pixel_values"},
    ]
    for case in broken:
        with pytest.raises(ValueError), torch.no_grad():
            tiny.model(**case)
    with pytest.raises(ValueError, match="reply"):
        build_tiny_model(tiny.directory.parent / "bad", script=[{"when": "x", "answer": "y"}])


def test_random_rows_never_stop_but_a_logits_processor_can_stop_them(tiny):
    from transformers import LogitsProcessor, LogitsProcessorList

    inputs = tiny.processor(_prompt("describe the photo", 1), [_image(48, 48, 5)])
    tokens = _generate(tiny, inputs, max_new_tokens=64)
    assert len(tokens) == 64
    specials = set(tiny.tokenizer.all_special_ids)
    assert not specials & set(tokens)
    assert max(tokens) < len(tiny.tokenizer)
    text = tiny.tokenizer.decode(tokens)
    assert all(c.isprintable() or c in "\n\t" for c in text)  # whole characters, no controls
    sampled = _generate(tiny, inputs, max_new_tokens=64, do_sample=True, temperature=2.0, top_k=0)
    assert len(sampled) == 64 and not specials & set(sampled)

    class EndAt(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - prompt_length == 5:
                scores[:] = -float("inf")
                scores[:, tiny.end_id] = 0
            return scores

    prompt_length = inputs["input_ids"].shape[1]
    stopped = _generate(tiny, inputs, max_new_tokens=64, logits_processor=LogitsProcessorList([EndAt()]))
    assert stopped == [*tokens[:5], tiny.end_id]


def test_scripted_reply_streams_exactly_and_stops_at_end(tiny):
    inputs = tiny.processor(_prompt("please show me the code", 2), [_image(40, 40, 6)] * 2)
    text, tokens = _stream(tiny, inputs, max_new_tokens=500)
    assert text == MEDIUM_REPLY
    assert tokens[-1] == tiny.end_id


def test_scripted_long_reply(tiny):
    inputs = tiny.processor(_prompt("say something long"), None)
    text, tokens = _stream(tiny, inputs, max_new_tokens=4000)
    assert text == _long_reply()
    assert len(text) == LONG_REPLY_CHARS
    assert tokens[-1] == tiny.end_id


def test_without_end_as_eos_the_model_runs_on(tiny):
    inputs = tiny.processor(_prompt("count the images", 1), [_image(40, 40, 7)])
    text, tokens = _stream(tiny, inputs, max_new_tokens=200, eos_token_id=tiny.eos_id)
    reply = "I was given 1 image(s) and asked: count the images"
    assert text == reply + "\nand then I kept talking"  # <|assistant|> eats the "\n" after it
    assert tiny.end_id in tokens and tokens[-1] == tiny.eos_id
    # With only max_new_tokens, the scripted row keeps saying <|endoftext|>.
    more = _generate(tiny, inputs, max_new_tokens=len(tokens) + 3, eos_token_id=None)
    assert more[: len(tokens)] == tokens and more[len(tokens) :] == [tiny.eos_id] * 3


def test_reply_placeholders_and_last_user_turn(tiny):
    prompt = (
        "<|user|>\n<|image_1|>\nshow me the code<|end|>\n<|assistant|>\nNo.<|end|>\n"
        "<|user|>\n<|image_2|>\n<|image_3|>\n  Now count the images, please.  <|end|>\n"
        "<|assistant|>\n"
    )
    images = [_image(40, 40, n) for n in range(3)]
    text, _ = _stream(tiny, tiny.processor(prompt, images), max_new_tokens=200)
    assert text == "I was given 3 image(s) and asked: Now count the images, please."
    # A rule that matched an earlier turn only does not apply.
    prompt = (
        "<|user|>\nshow me the code<|end|>\n<|assistant|>\nNo.<|end|>\n<|user|>\nwhy?<|end|>\n<|assistant|>\n"
    )
    text, tokens = _stream(tiny, tiny.processor(prompt, None), max_new_tokens=20)
    assert len(tokens) == 20 and not MEDIUM_REPLY.startswith(text[:10])


def test_seconds_per_token_slows_the_scripted_reply(tiny):
    inputs = tiny.processor(_prompt("answer slowly"), None)
    started = time.perf_counter()
    text, tokens = _stream(tiny, inputs, max_new_tokens=50)
    assert text == "one two three four five"
    assert time.perf_counter() - started >= 0.02 * len(tokens)


def _left_padded_batch(tiny, rows: list[dict]) -> dict:
    length = max(row["input_ids"].shape[1] for row in rows)
    pad = tiny.tokenizer.pad_token_id

    def left_pad(tensor, value):
        return torch.nn.functional.pad(tensor, (length - tensor.shape[1], 0), value=value)

    batch = {
        "input_ids": torch.cat([left_pad(row["input_ids"], pad) for row in rows]),
        "attention_mask": torch.cat([left_pad(row["attention_mask"], 0) for row in rows]),
    }
    with_images = [row for row in rows if "pixel_values" in row]
    if with_images:
        batch["pixel_values"] = torch.cat([row["pixel_values"] for row in with_images])
        batch["image_sizes"] = torch.cat([row["image_sizes"] for row in with_images])
    return batch


def test_left_padded_batch_matches_one_at_a_time(tiny):
    processor = tiny.processor
    rows = [
        processor(_prompt("What is in the photo?", 1), [_image(64, 48, 20)]),
        processor(
            _prompt("What is the difference between these two images, in detail?", 2),
            [_image(30, 120, 21), _image(50, 50, 22)],
        ),
        processor(_prompt("count the images"), None),
        processor(_prompt("show me the code", 1), [_image(20, 20, 23)]),
    ]
    alone = [_generate(tiny, row, max_new_tokens=24) for row in rows]
    batch = _copy(_left_padded_batch(tiny, rows))
    output = tiny.model.generate(
        **batch,
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=[tiny.end_id, tiny.eos_id],
        pad_token_id=tiny.eos_id,
    )
    together = output[:, batch["input_ids"].shape[1] :].tolist()
    for single, batched in zip(alone, together, strict=True):
        assert batched[: len(single)] == single
        assert all(token == tiny.eos_id for token in batched[len(single) :])
    assert alone[0] != alone[1]
    assert tiny.tokenizer.decode(alone[2], skip_special_tokens=True).startswith("I was given 0")
