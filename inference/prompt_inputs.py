"""A request's conversation as Phi-3-vision model inputs that fit the context.

The processor turns the prompt and its images into ``input_ids`` (images as negative
placeholders), ``pixel_values`` and ``image_sizes``; the oldest exchanges are dropped until
the prompt and its longest answer fit the model's context.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .conversation import Conversation, build_prompt, without_oldest_exchange
from .engine import GenerationRequest, PromptTooLong
from .settings import InferenceSettings

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "pixel_values", "image_sizes")


def default_num_crops(image_count: int) -> int:
    """The model cards' advice: 16 crops for a single image, 4 for multi-image prompts."""
    return 16 if image_count <= 1 else 4


class PromptEncoder:
    """``encode(request, max_new_tokens)``: the model inputs (on the CPU, one row)."""

    def __init__(self, processor: Any, settings: InferenceSettings, context: int | None) -> None:
        self._processor = processor
        self._settings = settings
        self.context = settings.max_context_tokens or context

    def encode_conversation(
        self, conversation: Conversation, num_crops: int | None = None
    ) -> dict[str, torch.Tensor]:
        images = [image if image.mode == "RGB" else image.convert("RGB") for image in conversation.images]
        if images:
            self._processor.image_processor.num_crops = (
                num_crops or self._settings.num_crops or default_num_crops(len(images))
            )
        encoded = self._processor(build_prompt(conversation), images or None, return_tensors="pt")
        return {name: encoded[name] for name in MODEL_INPUTS if name in encoded}

    def encode(self, request: GenerationRequest, max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Encode the conversation, dropping its oldest exchanges until it fits the context."""
        context = self.context
        conversation: Conversation | None = request.conversation
        dropped = 0
        length = 0
        while conversation is not None:
            inputs = self.encode_conversation(conversation, request.num_crops)
            length = inputs["input_ids"].shape[1]
            if context is None or length + max_new_tokens <= context:
                if dropped:
                    log.info("left out the %d oldest exchange(s) to fit %d tokens", dropped, context)
                return inputs
            conversation = without_oldest_exchange(conversation)
            dropped += 1
        assert context is not None
        raise PromptTooLong(
            f"the question and its images take {length} tokens, and the model reads at most "
            f"{context - max_new_tokens} before answering; try fewer images or a shorter question"
        )
