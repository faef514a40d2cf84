"""Model-side settings, read from the environment (and `.env`, loaded by the entry points).

The names are a contract with operators (README, `.env.example`); parsing fails loudly with
the setting's name so a typo in `.env` is a one-line error instead of odd behaviour later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MODEL_ID = "microsoft/Phi-3-vision-128k-instruct"
DEFAULT_OPENAI_BASE_URL = "http://localhost:8000/v1"
ENGINES = ("local", "openai")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SWITCHES = ("auto", "on", "off")
QUANTIZE_CHOICES = ("none", "8bit", "4bit")
# MAX_BATCH_TOKENS=auto where there is no free-memory figure to size from (the CPU).
DEFAULT_MAX_BATCH_TOKENS = 16384


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message names the setting."""


def env_str(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name, "").strip()
    return value or default


def env_int(env: Mapping[str, str], name: str, default: int | None, *, minimum: int = 0) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env.get(name, "").strip() or default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def env_tokens_or_auto(env: Mapping[str, str], name: str) -> int | None:
    """A token count, or None for ``auto`` (and for empty)."""
    if env.get(name, "").strip().lower() == "auto":
        return None
    try:
        return env_int(env, name, None, minimum=16)
    except SettingsError as error:
        raise SettingsError(f"{error} (or auto)") from None


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise SettingsError(f"{name} must be above 0 and at most 1, got {value}")
    return value


def check_device(value: str) -> str:
    value = value.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise SettingsError(f"DEVICE must be auto, cpu, cuda or cuda:N; got {value!r}")


def check_base_url(value: str) -> str:
    value = value.strip().rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"OPENAI_BASE_URL must start with http:// or https://; got {value!r}")
    return value


@dataclass(frozen=True)
class InferenceSettings:
    model_id: str = DEFAULT_MODEL_ID
    model_revision: str | None = None
    # The generic path may run Python code from a model's hub repository only when this is on.
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    # QUANTIZE: the language model's linear layers in bitsandbytes int8 ("8bit") or nf4
    # ("4bit"); the vision tower, projection, embeddings and lm_head stay in DTYPE.
    quantize: str = "none"
    # None follows the model cards' advice: 16 crops for one image, 4 when there are several.
    num_crops: int | None = None
    max_new_tokens: int = 1000
    temperature: float = 0.0
    # None: the model's own context (max_position_embeddings). Lower it to bound GPU memory.
    max_context_tokens: int | None = None
    # Continuous batching in the local engine: at most this many answers at once, and at most
    # this many tokens (prompts + answers: the KV cache) in all. None (auto): on CUDA, sized
    # after loading to GPU_MEMORY_FRACTION of the GPU's memory less what is in use; elsewhere
    # DEFAULT_MAX_BATCH_TOKENS.
    max_batch_size: int = 8
    max_batch_tokens: int | None = None
    gpu_memory_fraction: float = 0.90
    # A long prompt joining running answers is prefilled this many tokens per decode step, so
    # the answers already streaming keep streaming.
    prefill_chunk_tokens: int = 512
    # COMPILE: the decode step compiled (CUDA graphs on CUDA, inductor on the CPU); auto = on
    # with CUDA. Its artefacts are kept in COMPILE_CACHE_DIR (None:
    # ~/.cache/seebot/torch-compile) for the next start.
    compile: str = "auto"
    compile_cache_dir: str | None = None
    engine: str = "local"
    # ENGINE=openai: an OpenAI-compatible server (such as vLLM) runs the model.
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    openai_api_key: str | None = field(default=None, repr=False)  # a secret: never logged
    # None: MODEL_ID's value, the name vLLM serves a model under unless told otherwise.
    openai_model: str | None = None
    openai_max_retries: int = 3
    openai_retry_delay_seconds: float = 0.5
    openai_timeout_seconds: float = 120.0
    openai_startup_timeout_seconds: float = 120.0

    @property
    def served_model(self) -> str:
        """The model name sent to the OpenAI-compatible server."""
        return self.openai_model or self.model_id

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InferenceSettings:
        env = os.environ if env is None else env
        return cls(
            model_id=env_str(env, "MODEL_ID", DEFAULT_MODEL_ID) or DEFAULT_MODEL_ID,
            model_revision=env_str(env, "MODEL_REVISION", None),
            trust_remote_code=env_bool(env, "TRUST_REMOTE_CODE", False),
            device=check_device(env_str(env, "DEVICE", "auto") or "auto"),
            dtype=env_choice(env, "DTYPE", "auto", DTYPES),
            quantize=env_choice(env, "QUANTIZE", "none", QUANTIZE_CHOICES),
            num_crops=env_int(env, "NUM_CROPS", None, minimum=1),
            max_new_tokens=env_int(env, "MAX_NEW_TOKENS", 1000, minimum=1) or 1000,
            temperature=env_float(env, "TEMPERATURE", 0.0),
            max_context_tokens=env_int(env, "MAX_CONTEXT_TOKENS", None, minimum=16),
            max_batch_size=env_int(env, "MAX_BATCH_SIZE", 8, minimum=1) or 8,
            max_batch_tokens=env_tokens_or_auto(env, "MAX_BATCH_TOKENS"),
            gpu_memory_fraction=check_fraction(
                "GPU_MEMORY_FRACTION", env_float(env, "GPU_MEMORY_FRACTION", 0.90)
            ),
            prefill_chunk_tokens=env_int(env, "PREFILL_CHUNK_TOKENS", 512, minimum=1) or 512,
            compile=env_choice(env, "COMPILE", "auto", SWITCHES),
            compile_cache_dir=env_str(env, "COMPILE_CACHE_DIR", None),
            engine=env_choice(env, "ENGINE", "local", ENGINES),
            openai_base_url=check_base_url(
                env_str(env, "OPENAI_BASE_URL", DEFAULT_OPENAI_BASE_URL) or DEFAULT_OPENAI_BASE_URL
            ),
            openai_api_key=env_str(env, "OPENAI_API_KEY", None),
            openai_model=env_str(env, "OPENAI_MODEL", None),
            openai_max_retries=env_int(env, "OPENAI_MAX_RETRIES", 3) or 0,
            openai_retry_delay_seconds=env_float(env, "OPENAI_RETRY_DELAY_SECONDS", 0.5),
            openai_timeout_seconds=env_float(env, "OPENAI_TIMEOUT_SECONDS", 120.0, minimum=1.0),
            openai_startup_timeout_seconds=env_float(env, "OPENAI_STARTUP_TIMEOUT_SECONDS", 120.0),
        )
