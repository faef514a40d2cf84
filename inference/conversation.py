"""A conversation of turns and the Phi-3-vision prompt it becomes.

The prompt format is the model's chat template with one `<|image_N|>` tag per image; images
are numbered 1..N in order of appearance across the whole conversation because the
processor pairs the N-th image with `<|image_N|>` and rejects gaps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Role = Literal["user", "assistant"]

# Every special token of the Phi-3 tokenizers has the form <|name|>; the Llama-style ones
# are <s>, </s> and <unk>. A zero-width space after "<" keeps the text readable while the
# tokenizer and the processor's image-tag pattern no longer see a token.
_CONTROL_TOKEN = re.compile(r"<(?=\||/?s>|unk>)")
_ZERO_WIDTH_SPACE = "\u200b"


def neutralise(text: str) -> str:
    """Defuse control tokens in untrusted text so it cannot add image tags or fake a turn."""
    return _CONTROL_TOKEN.sub("<" + _ZERO_WIDTH_SPACE, text)


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    images: Sequence[Image.Image] = field(default_factory=tuple)


@dataclass(frozen=True)
class Conversation:
    turns: Sequence[Turn]

    @classmethod
    def single(cls, question: str, images: Sequence[Image.Image] = ()) -> Conversation:
        return cls((Turn("user", question, tuple(images)),))

    @property
    def images(self) -> list[Image.Image]:
        """All images in prompt order: the N-th is the one tagged `<|image_N|>`."""
        return [image for turn in self.turns for image in turn.images]


class PromptError(ValueError):
    """The conversation cannot be turned into a prompt (a caller's mistake)."""


def build_prompt(conversation: Conversation) -> str:
    """The Phi-3-vision prompt for a conversation that ends with the user's question."""
    if not conversation.turns or conversation.turns[-1].role != "user":
        raise PromptError("a conversation must end with a user turn")
    parts: list[str] = []
    image_number = 0
    for turn in conversation.turns:
        if turn.role == "user":
            tags = []
            for _ in turn.images:
                image_number += 1
                tags.append(f"<|image_{image_number}|>\n")
            parts.append(f"<|user|>\n{''.join(tags)}{neutralise(turn.text)}<|end|>\n")
        elif turn.role == "assistant":
            if turn.images:
                raise PromptError("assistant turns cannot carry images")
            parts.append(f"<|assistant|>\n{neutralise(turn.text)}<|end|>\n")
        else:
            raise PromptError(f"unknown role {turn.role!r}")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def without_oldest_exchange(conversation: Conversation) -> Conversation | None:
    """The conversation less its first question and the answers to it, to fit the context.

    None when only the last question is left: that one is never dropped.
    """
    turns = list(conversation.turns)
    user_turns = [index for index, turn in enumerate(turns) if turn.role == "user"]
    if len(user_turns) < 2:
        return None
    return Conversation(tuple(turns[user_turns[1] :]))
