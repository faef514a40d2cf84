"""Bot settings from the environment (and `.env`); see `.env.example` for every name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from inference.settings import InferenceSettings, SettingsError, env_float, env_int, env_str

OCR_PROMPT = (
    "Extract all the text in this image exactly as written, keeping the line breaks. "
    "Reply with the text only."
)
# The cookbook's wording, kept as is: it is what the model was shown during fine-tuning demos.
COMPARE_PROMPT = "What is difference in this two images?"
DESCRIBE_PROMPT = "Describe this image in detail."


class MissingToken(SettingsError):
    """DISCORD_TOKEN is not set."""


@dataclass(frozen=True)
class BotSettings:
    token: str = field(repr=False)  # never printed, never logged
    api_base_url: str | None = None
    dev_guild_id: int | None = None
    edit_interval_seconds: float = 1.0
    ocr_prompt: str = OCR_PROMPT
    compare_prompt: str = COMPARE_PROMPT
    describe_prompt: str = DESCRIBE_PROMPT
    log_level: str = "INFO"
    inference: InferenceSettings = field(default_factory=InferenceSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotSettings:
        env = os.environ if env is None else env
        token = env.get("DISCORD_TOKEN", "").strip()
        if not token:
            raise MissingToken(
                "DISCORD_TOKEN is not set: copy .env.example to .env and put your bot's token in it"
            )
        return cls(
            token=token,
            api_base_url=(env_str(env, "DISCORD_API_BASE_URL", None) or "").rstrip("/") or None,
            dev_guild_id=env_int(env, "DEV_GUILD_ID", None, minimum=1),
            edit_interval_seconds=env_float(env, "STREAM_EDIT_INTERVAL_SECONDS", 1.0, minimum=0.0),
            ocr_prompt=env_str(env, "OCR_PROMPT", OCR_PROMPT) or OCR_PROMPT,
            compare_prompt=env_str(env, "COMPARE_PROMPT", COMPARE_PROMPT) or COMPARE_PROMPT,
            describe_prompt=env_str(env, "DESCRIBE_PROMPT", DESCRIBE_PROMPT) or DESCRIBE_PROMPT,
            log_level=(env_str(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
            inference=InferenceSettings.from_env(env),
        )
