"""Processor of the tiny Phi-3-vision stand-in.

Remote code: ``builder.py`` copies this file into the model directory; it imports only
transformers and the standard library.

Same calling convention as the hub's ``Phi3VProcessor``: one prompt at a time; the prompt
names its images with ``<|image_1|>``, ``<|image_2|>``, ...; each tag becomes a run of the
negative id ``-N`` as long as image N's token count; every text chunk between tags is
tokenized on its own (so each starts with ``<s>``, as with the hub processor).
"""

from __future__ import annotations

import re
from typing import ClassVar

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


class TinyPhi3VProcessor(ProcessorMixin):
    """Wraps ``image_processor`` (with a settable ``num_crops``) and ``tokenizer``."""

    attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"
    special_image_token = "<|image|>"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text,
        images=None,
        padding=False,
        truncation=None,
        max_length=None,
        return_tensors="pt",
    ) -> BatchFeature:
        if images is None:
            encoded = self.tokenizer(
                text,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
            )
            return BatchFeature(data=dict(encoded))
        if not isinstance(text, str):
            raise ValueError("with images, the processor takes one prompt (a str) at a time")
        if not isinstance(images, (list, tuple)):
            images = [images]
        image_inputs = self.image_processor(images, return_tensors=return_tensors)
        counts = image_inputs["num_img_tokens"]

        tags = [int(number) for number in IMAGE_TAG.findall(text)]
        distinct = sorted(set(tags))
        if distinct != list(range(1, len(distinct) + 1)):
            raise ValueError(f"image tags must be numbered 1..N without gaps, got {distinct} in the prompt")
        if len(distinct) != len(images):
            raise ValueError(f"the prompt names {len(distinct)} image(s) but {len(images)} were given")

        chunks = IMAGE_TAG.split(text)[::2]  # split() also returns the captured numbers
        input_ids: list[int] = []
        for index, chunk in enumerate(chunks):
            input_ids.extend(self.tokenizer(chunk).input_ids)
            if index < len(tags):
                number = tags[index]
                input_ids.extend([-number] * int(counts[number - 1]))
        data = {
            "input_ids": [input_ids],
            "attention_mask": [[1] * len(input_ids)],
            "pixel_values": image_inputs["pixel_values"],
            "image_sizes": image_inputs["image_sizes"],
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def calc_num_image_tokens(self, images) -> list[int]:
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    @property
    def special_image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.special_image_token)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        return list(dict.fromkeys(names))
