"""Model-facing code: prompts, engines and the worker thread. Never imports discord."""

from .conversation import Conversation, PromptError, Turn, build_prompt, neutralise
from .engine import (
    EndReason,
    Engine,
    EngineClosed,
    EngineError,
    GenerationError,
    GenerationRequest,
    StartProgress,
)
from .settings import InferenceSettings, SettingsError

__all__ = [
    "Conversation",
    "EndReason",
    "Engine",
    "EngineClosed",
    "EngineError",
    "GenerationError",
    "GenerationRequest",
    "InferenceSettings",
    "PromptError",
    "SettingsError",
    "StartProgress",
    "Turn",
    "build_prompt",
    "create_engine",
    "neutralise",
]


def create_engine(settings: InferenceSettings) -> Engine:
    """The engine named by `settings.engine` (imported lazily: torch is heavy)."""
    if settings.engine == "local":
        from .local_engine import LocalEngine

        return LocalEngine(settings)
    if settings.engine == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    raise SettingsError(f"unknown ENGINE {settings.engine!r}")
