"""Phi-3-vision's processor: the HD image transform, image placeholders in the prompt, the tokenizer.

The numbers are the hub processor's (``image_processing_phi3_v.py``, ``processing_phi3_v.py``):

- per image: RGB; transposed when taller than wide; the largest ``scale`` with
  ``scale * ceil(scale / ratio) <= num_crops``; resized (torchvision, on the PIL image) to
  ``int(scale * S / ratio)`` x ``scale * S``; the height padded with white to a multiple of ``S``
  (``int(pad / 2)`` on top); transposed back. ``S`` is the crop side, 336 on the hub.
- ``ToTensor``, CLIP mean/std; the global view is a bicubic ``F.interpolate`` of that tensor to
  S x S (no antialias); the crops follow in row-major order; ``[global] + crops`` is zero-padded
  to ``num_crops + 1``. ``image_sizes`` is the padded height and width.
- the prompt is split on ``<|image_N|>``; every text chunk is tokenised on its own (with its BOS,
  as the hub does) and image N becomes ``[-N] * num_image_tokens``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import cached_file

__all__ = ["IMAGE_TAG", "Phi3VImageProcessor", "Phi3VProcessor", "hd_size", "num_image_tokens"]

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
HUB_CROP_SIZE = 336
HUB_TOKENS_PER_CROP = 144


def _scale(width: int, height: int, num_crops: int) -> int:
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_size(width: int, height: int, num_crops: int, crop_size: int = HUB_CROP_SIZE) -> tuple[int, int]:
    """The (width, height) an image of this size has after the HD transform (padded)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    new_width = _scale(width, height, num_crops) * crop_size
    new_height = int(new_width / (width / height))
    padded_height = math.ceil(new_height / crop_size) * crop_size
    return (padded_height, new_width) if transposed else (new_width, padded_height)


def num_image_tokens(
    width: int,
    height: int,
    num_crops: int,
    *,
    crop_size: int = HUB_CROP_SIZE,
    tokens_per_crop: int = HUB_TOKENS_PER_CROP,
) -> int:
    """Prompt positions one image takes: its crops and global view, each row closed by a separator."""
    padded_width, padded_height = hd_size(width, height, num_crops, crop_size)
    rows, columns = padded_height // crop_size, padded_width // crop_size
    side = math.isqrt(tokens_per_crop)
    return (rows * columns + 1) * tokens_per_crop + 1 + (rows + 1) * side


def _read_json(source: str, name: str, revision: str | None) -> dict[str, Any]:
    path = cached_file(source, name, revision=revision)
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class Phi3VImageProcessor:
    """Images -> ``pixel_values`` (images, num_crops + 1, 3, S, S) and ``image_sizes`` (images, 2)."""

    def __init__(
        self,
        num_crops: int = 16,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        crop_size: int = HUB_CROP_SIZE,
        num_img_tokens: int = HUB_TOKENS_PER_CROP,
    ) -> None:
        self.num_crops = int(num_crops)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.crop_size = int(crop_size)
        self.num_img_tokens = int(num_img_tokens)  # per crop, after the 2x2 merge (12 x 12)
        if math.isqrt(self.num_img_tokens) ** 2 != self.num_img_tokens:
            raise ValueError(f"num_img_tokens must be a square number of features, got {num_img_tokens}")
        self._mean = torch.tensor(self.image_mean).view(-1, 1, 1)
        self._std = torch.tensor(self.image_std).view(-1, 1, 1)

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None) -> Phi3VImageProcessor:
        """From the checkpoint's ``preprocessor_config.json`` (the hub's keys, plus ``crop_size``)."""
        settings = _read_json(source, PREPROCESSOR_CONFIG, revision)
        known = ("num_crops", "image_mean", "image_std", "crop_size", "num_img_tokens")
        return cls(**{key: settings[key] for key in known if key in settings})

    def num_image_tokens(self, width: int, height: int) -> int:
        return num_image_tokens(
            width, height, self.num_crops, crop_size=self.crop_size, tokens_per_crop=self.num_img_tokens
        )

    calc_num_image_tokens_from_image_size = num_image_tokens  # the hub processor's name

    def _hd_transform(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        transposed = width < height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
            width, height = image.size
        new_width = _scale(width, height, self.num_crops) * self.crop_size
        new_height = int(new_width / (width / height))
        image = TF.resize(image, [new_height, new_width])
        pad = math.ceil(new_height / self.crop_size) * self.crop_size - new_height
        top = int(pad / 2)
        image = TF.pad(image, [0, top, 0, pad - top], fill=[255, 255, 255])
        return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image

    def _crops_into(self, image: Image.Image, out: torch.Tensor) -> tuple[int, int]:
        """Write the image's ``[global] + crops`` into ``out`` (num_crops + 1, 3, S, S; zeros
        after them); returns its padded (height, width). ToTensor and Normalize's own operations,
        each pixel written once: a picture question's CPU time is mostly here."""
        size = self.crop_size
        hd = self._hd_transform(image if image.mode == "RGB" else image.convert("RGB"))
        width, height = hd.size
        tensor = torch.empty(3, height, width)
        for channel, band in zip(tensor, hd.split(), strict=True):  # bands: no slow uint8 transpose
            channel.copy_(torch.from_numpy(np.array(band)))
        tensor.div_(255).sub_(self._mean).div_(self._std)
        out[0] = torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bicubic")[0]
        rows, columns = height // size, width // size
        used = 1 + rows * columns
        out[1:used].view(rows, columns, 3, size, size).copy_(
            tensor.view(3, rows, size, columns, size).permute(1, 3, 0, 2, 4)
        )
        out[used:].zero_()
        return height, width

    def __call__(
        self, images: Sequence[Image.Image] | Image.Image, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixel_values = torch.empty(len(images), self.num_crops + 1, 3, self.crop_size, self.crop_size)
        sizes = [self._crops_into(image, out) for image, out in zip(images, pixel_values, strict=True)]
        data = {
            "pixel_values": pixel_values,
            "image_sizes": [list(size) for size in sizes],
            "num_img_tokens": [self.num_image_tokens(w, h) for h, w in sizes],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    preprocess = __call__


class Phi3VProcessor:
    """The prompt and its images -> ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes``."""

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source: str, *, revision: str | None = None) -> Phi3VProcessor:
        image_processor = Phi3VImageProcessor.from_pretrained(source, revision=revision)
        # Never the hub's tokenizer code: tokenizer.json through transformers' own classes.
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        return cls(image_processor, tokenizer)

    def num_image_tokens(self, width: int, height: int) -> int:
        return self.image_processor.num_image_tokens(width, height)

    def _row_ids(self, text: str, tokens_per_image: Sequence[int]) -> list[int]:
        chunks = IMAGE_TAG.split(text)[::2]  # the text between the tags
        ids: list[int] = list(self.tokenizer(chunks[0]).input_ids)
        for number, chunk in enumerate(chunks[1:], start=1):
            ids += [-number] * tokens_per_image[number - 1]
            ids += self.tokenizer(chunk).input_ids
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[Image.Image] | Image.Image | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
    ) -> BatchFeature:
        """One prompt or several (a batch, always padded to the longest on ``tokenizer.padding_side``;
        ``padding`` is accepted for the usual processor signature).

        In every prompt the tags are ``<|image_1|>``, ``<|image_2|>``... in order, each once;
        ``images`` holds the images of all prompts in that order.
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        per_row = [[int(n) for n in IMAGE_TAG.findall(row)] for row in texts]
        for numbers in per_row:
            if numbers != list(range(1, len(numbers) + 1)):
                raise ValueError(f"image tags must be <|image_1|>, <|image_2|>, ... in order, got {numbers}")
        wanted = sum(len(numbers) for numbers in per_row)
        if wanted != len(images):
            raise ValueError(f"the prompt has {wanted} image tag(s) but {len(images)} image(s) were given")
        image_inputs = self.image_processor(images, return_tensors=None) if images else None
        counts = image_inputs["num_img_tokens"] if image_inputs else []
        rows: list[list[int]] = []
        start = 0
        for row, numbers in zip(texts, per_row, strict=True):
            rows.append(self._row_ids(row, counts[start : start + len(numbers)]))
            start += len(numbers)
        data: dict[str, Any] = self._pad(rows)
        if image_inputs:
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _pad(self, rows: list[list[int]]) -> dict[str, list[list[int]]]:
        longest = max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = self.tokenizer.padding_side == "left"
        input_ids, attention_mask = [], []
        for row in rows:
            pad = longest - len(row)
            input_ids.append([pad_id] * pad + row if left else row + [pad_id] * pad)
            attention_mask.append([0] * pad + [1] * len(row) if left else [1] * len(row) + [0] * pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)
