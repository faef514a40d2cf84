"""Image processor of the tiny Phi-3-vision stand-in.

Remote code: ``builder.py`` copies this file into the model directory; it imports only torch,
transformers, PIL, numpy and the standard library.

It follows the hub processor's conventions at a much smaller scale: an image is resized so
that a grid of at most ``num_crops`` square crops covers it, padded with white to whole crops,
and cut into crops; a downscaled copy of the whole image (the "global" crop) goes first. The
real model uses 336-pixel crops worth 144 tokens each; this one uses ``crop_size``-pixel crops
worth ``tokens_per_crop`` tokens, so an image costs

    (rows * cols + 1) * tokens_per_crop + 1 + (rows + 1)

tokens, where ``rows`` x ``cols`` is the crop grid (the hub formula with 144 -> tokens_per_crop
and 12 -> 1).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_layout(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int, int, int]:
    """Return ``(resized_w, resized_h, padded_w, padded_h)`` for an image of that size.

    The longer side becomes ``scale * crop_size`` for the largest ``scale`` whose grid still
    holds at most ``num_crops`` crops; the shorter side keeps the aspect ratio and is then
    padded up to whole crops.
    """
    if num_crops < 1:
        raise ValueError(f"num_crops must be at least 1, got {num_crops}")
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    resized_long = scale * crop_size
    resized_short = max(1, int(resized_long / ratio))
    padded_short = math.ceil(resized_short / crop_size) * crop_size
    if width >= height:
        return resized_long, resized_short, resized_long, padded_short
    return resized_short, resized_long, padded_short, resized_long


def num_image_tokens(
    width: int, height: int, num_crops: int = 16, crop_size: int = 16, tokens_per_crop: int = 2
) -> int:
    """Number of placeholder tokens the processor inserts for a ``width`` x ``height`` image."""
    _, _, padded_w, padded_h = hd_layout(width, height, num_crops, crop_size)
    return tokens_for_padded_size(padded_h, padded_w, crop_size, tokens_per_crop)


def tokens_for_padded_size(padded_h: int, padded_w: int, crop_size: int, tokens_per_crop: int) -> int:
    """Token count from an entry of ``image_sizes`` (the padded ``(height, width)``)."""
    rows, cols = padded_h // crop_size, padded_w // crop_size
    return (rows * cols + 1) * tokens_per_crop + 1 + (rows + 1)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


class TinyPhi3VImageProcessor(BaseImageProcessor):
    """Turns images into ``pixel_values`` of shape (num_images, num_crops + 1, 3, s, s).

    ``num_crops`` is a plain attribute (16 in the saved config) that callers may change
    between calls, like the hub processor's.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        num_crops: int = 1,
        crop_size: int = 16,
        tokens_per_crop: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.tokens_per_crop = tokens_per_crop
        self.image_mean = list(image_mean) if image_mean is not None else list(CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(CLIP_STD)
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return num_image_tokens(width, height, self.num_crops, self.crop_size, self.tokens_per_crop)

    def calc_num_image_tokens(self, images) -> list[int]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [self.calc_num_image_tokens_from_image_size(*_to_pil(im).size) for im in images]

    def _normalize(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def _crops(self, image: Image.Image) -> tuple[torch.Tensor, list[int], int]:
        size = self.crop_size
        resized_w, resized_h, padded_w, padded_h = hd_layout(*image.size, self.num_crops, size)
        canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
        canvas.paste(
            image.resize((resized_w, resized_h), Image.BICUBIC),
            ((padded_w - resized_w) // 2, (padded_h - resized_h) // 2),
        )
        rows, cols = padded_h // size, padded_w // size
        local = self._normalize(canvas).reshape(3, rows, size, cols, size)
        local = local.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
        whole = self._normalize(canvas.resize((size, size), Image.BICUBIC)).unsqueeze(0)
        crops = torch.zeros(self.num_crops + 1, 3, size, size)
        crops[: rows * cols + 1] = torch.cat([whole, local])
        tokens = tokens_for_padded_size(padded_h, padded_w, size, self.tokens_per_crop)
        return crops, [padded_h, padded_w], tokens

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given; pass images=None for a text-only prompt")
        # Crops are always RGB; do_convert_rgb is kept for config compatibility only.
        pil_images = [_to_pil(im).convert("RGB") for im in images]
        results = [self._crops(im) for im in pil_images]
        data = {
            "pixel_values": torch.stack([crops for crops, _, _ in results]),
            "image_sizes": [size for _, size, _ in results],
            "num_img_tokens": [tokens for _, _, tokens in results],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)
