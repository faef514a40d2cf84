"""The native Phi-3-vision processor: the hub's numbers for image tokens, crops and prompts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference.phi3v import Phi3VImageProcessor, Phi3VProcessor, hd_size, num_image_tokens

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255.0 - CLIP_MEAN) / CLIP_STD


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "tokens"),
    [
        # The hub processor's calc_num_image_tokens_from_image_size, run on these sizes.
        (1280, 720, 16, 2353),
        (1280, 720, 4, 757),
        (720, 1280, 16, 2377),  # portrait: 5 rows of 3 crops
        (1, 1, 16, 2509),  # 4x4 crops
        (1, 1, 1, 313),
        (4000, 300, 16, 2041),  # 13 crops in one row
        (300, 4000, 16, 2185),  # 13 rows of one crop
        (336, 336, 4, 757),
    ],
)
def test_image_tokens_per_image_are_the_hubs(width: int, height: int, num_crops: int, tokens: int) -> None:
    assert num_image_tokens(width, height, num_crops) == tokens
    padded_width, padded_height = hd_size(width, height, num_crops)
    rows, columns = padded_height // 336, padded_width // 336
    assert rows * columns <= num_crops
    assert tokens == (rows * columns + 1) * 144 + 1 + (rows + 1) * 12


def test_crops_are_in_row_major_order_after_the_global_view() -> None:
    quadrants = Image.new("RGB", (672, 672))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # top-left, top-right, ...
    for index, colour in enumerate(colours):
        quadrants.paste(
            colour, ((index % 2) * 336, (index // 2) * 336, (index % 2 + 1) * 336, (index // 2 + 1) * 336)
        )
    out = Phi3VImageProcessor(num_crops=4)([quadrants])
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672]]
    for index, colour in enumerate(colours):
        crop = out["pixel_values"][0, 1 + index]
        assert torch.allclose(crop[:, 100, 100], normalised(colour), atol=1e-5)
    global_view = out["pixel_values"][0, 0]  # the whole image at 336x336
    assert torch.allclose(global_view[:, 20, 20], normalised(colours[0]), atol=1e-4)
    assert torch.allclose(global_view[:, 300, 300], normalised(colours[3]), atol=1e-4)


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_padding_is_white_and_centred_with_the_extra_row_at_the_bottom(portrait: bool) -> None:
    # 672x500 at 4 crops keeps its size and is padded by 172 rows: 86 on top, 86 below.
    size = (500, 672) if portrait else (672, 500)
    out = Phi3VImageProcessor(num_crops=4)([Image.new("RGB", size, (0, 0, 0))])
    assert out["image_sizes"].tolist() == [[672, 672]]
    first = out["pixel_values"][0, 1]  # the top-left crop
    white, black = normalised((255, 255, 255)), normalised((0, 0, 0))

    def pixel(offset: int) -> torch.Tensor:  # along the padded direction, in the middle across
        return first[:, 168, offset] if portrait else first[:, offset, 168]

    assert torch.allclose(pixel(85), white, atol=1e-5)
    assert torch.allclose(pixel(86), black, atol=1e-5)


def test_unused_crop_slots_are_zero() -> None:
    out = Phi3VImageProcessor(num_crops=16)([Image.new("RGB", (1280, 720), (9, 9, 9))])
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[1008, 1680]]  # 3 rows of 5 crops: slots 1..15
    assert bool(out["pixel_values"][0, 15].abs().sum() > 0)
    assert bool(out["pixel_values"][0, 16].eq(0).all())


def test_the_prompt_gets_each_image_as_negative_ids_and_each_chunk_its_bos(processor: Phi3VProcessor) -> None:
    tokenizer = processor.tokenizer
    processor.image_processor.num_crops = 4
    images = [Image.new("RGB", (1280, 720)), Image.new("RGB", (300, 900))]
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is difference?<|end|>\n<|assistant|>\n"
    out = processor(prompt, images, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    first, second = processor.num_image_tokens(1280, 720), processor.num_image_tokens(300, 900)
    chunks = ["<|user|>\n", "\n", "\nWhat is difference?<|end|>\n<|assistant|>\n"]
    expected = tokenizer(chunks[0]).input_ids + [-1] * first + tokenizer(chunks[1]).input_ids
    expected += [-2] * second + tokenizer(chunks[2]).input_ids
    assert ids == expected
    assert ids.count(tokenizer.bos_token_id) == 3
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["pixel_values"].shape == (2, 5, 3, 28, 28)
    assert out["image_sizes"].shape == (2, 2)


def test_a_text_only_prompt_is_the_tokenizers_own(processor: Phi3VProcessor) -> None:
    prompt = "<|user|>\nSay hello<|end|>\n<|assistant|>\n"
    out = processor(prompt, return_tensors="pt")
    assert out["input_ids"].tolist() == [processor.tokenizer(prompt).input_ids]
    assert "pixel_values" not in out


def test_a_batch_of_prompts_is_padded_and_takes_its_images_in_row_order(processor: Phi3VProcessor) -> None:
    processor.image_processor.num_crops = 16
    images = [Image.new("RGB", (50, 50)), Image.new("RGB", (90, 30)), Image.new("RGB", (30, 90))]
    texts = ["<|image_1|>one", "plain text and nothing else at all here", "<|image_1|><|image_2|>two"]
    out = processor(texts, images, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 3 and out["pixel_values"].shape[0] == 3
    pad = processor.tokenizer.pad_token_id
    for row, text in enumerate(texts):
        alone = processor(text, [images[0]] if row == 0 else images[1:] if row == 2 else None)["input_ids"][0]
        length = len(alone)
        assert ids[row, :length].tolist() == alone.tolist()  # padded on the right (the tokenizer's side)
        assert ids[row, length:].eq(pad).all() and mask[row].sum() == length
    assert int((ids[2] == -1).sum()) == processor.num_image_tokens(90, 30)
    assert int((ids[2] == -2).sum()) == processor.num_image_tokens(30, 90)


@pytest.mark.parametrize(
    ("prompt", "count", "message"),
    [
        ("<|image_1|>hi", 0, "1 image tag(s) but 0 image(s)"),
        ("hi", 1, "0 image tag(s) but 1 image(s)"),
        ("<|image_2|><|image_1|>hi", 2, "in order"),
        ("<|image_1|><|image_1|>hi", 2, "in order"),
    ],
)
def test_tags_and_images_must_agree(processor: Phi3VProcessor, prompt: str, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(prompt, [Image.new("RGB", (20, 20))] * count)
