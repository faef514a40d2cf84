"""The small interface every engine implements; the bot sees nothing else.

An engine takes a `GenerationRequest` and yields text pieces as they are generated.
Closing the iterator (break, `aclose()`, or cancelling the task that iterates) cancels
the request: it leaves the queue, or its generation stops within a token or two.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from .conversation import Conversation


class EngineError(RuntimeError):
    """A request could not be answered; the message is safe to show to a user."""


class EngineClosed(EngineError):
    """The engine is shutting down or was never started."""


class ModelLoadError(EngineError):
    """The model or processor could not be loaded; the message says which and why."""


class GenerationError(EngineError):
    """Generation failed inside the engine; `__cause__` holds the original exception."""


class PromptTooLong(EngineError):
    """The question and its images do not fit in the model's context, even alone."""


# Why an answer ended: its own end token, or the token limit (MAX_NEW_TOKENS or the context).
EndReason = Literal["stop", "length"]
# Told, on the event loop, how far a start is, in a few words ("warming up: 3 of 24 decode
# shapes"), for the bot's status while it starts.
StartProgress = Callable[[str], None]


@dataclass(frozen=True)
class GenerationRequest:
    conversation: Conversation
    # None means "the engine's setting" for each of these.
    max_new_tokens: int | None = None
    temperature: float | None = None
    num_crops: int | None = None
    # Called on the event loop with the request's place in line (1 = next) while it waits,
    # and with 0 when its generation starts. Engines without a queue of their own never call it.
    on_queue_position: Callable[[int], None] | None = None
    # Called on the event loop once, just before the stream ends normally, with why it ended.
    # Engines that cannot tell never call it.
    on_end: Callable[[EndReason], None] | None = None


class Engine(Protocol):
    async def start(self, on_progress: StartProgress | None = None) -> None:
        """Load the model (or connect); returns when requests can be served. ``on_progress``
        hears how far it is (engines that cannot tell never call it)."""

    async def close(self) -> None:
        """Stop serving: pending requests fail with `EngineClosed`; resources are freed."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """The answer as text pieces, in order, ending when generation ends."""
        ...
