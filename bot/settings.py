"""Bot settings from the environment (and `.env`); see `.env.example` for every name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inference.settings import InferenceSettings, SettingsError, env_bool, env_float, env_int, env_str

OCR_PROMPT = (
    "Extract all the text in this image exactly as written, keeping the line breaks. "
    "Reply with the text only."
)
# The cookbook's wording, kept as is: it is what the model was shown during fine-tuning demos.
COMPARE_PROMPT = "What is difference in this two images?"
DESCRIBE_PROMPT = "Describe this image in detail."
DEFAULT_DATA_DIR = Path("~/.local/share/seebot").expanduser()


def env_ids(env: Mapping[str, str], name: str) -> frozenset[int]:
    """A comma- or space-separated list of Discord ids (snowflakes)."""
    raw = env.get(name, "").replace(",", " ").split()
    try:
        return frozenset(int(part) for part in raw)
    except ValueError:
        raise SettingsError(f"{name} must be Discord ids separated by commas, got {env[name]!r}") from None


def env_shards(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip().lower()
    if raw == "auto":
        return 0
    return env_int(env, name, None, minimum=1)


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
    # Fair use (bot/limits.py): questions waiting or running in all, per person, and a pause.
    max_queue: int = 32
    max_pending_per_user: int = 2
    user_cooldown_seconds: float = 0.0
    generation_timeout_seconds: float = 300.0
    # Who may use the bot (bot/access.py); an empty set means "no restriction".
    allowed_guild_ids: frozenset[int] = frozenset()
    allowed_channel_ids: frozenset[int] = frozenset()
    allowed_role_ids: frozenset[int] = frozenset()
    allowed_user_ids: frozenset[int] = frozenset()
    blocked_user_ids: frozenset[int] = frozenset()
    allow_dms: bool = True
    # None: one gateway connection; 0: as many shards as Discord advises; N: N shards.
    shard_count: int | None = None
    # Images people send (bot/images.py): bytes per image (declared and downloaded), pixels
    # per image (checked from the header, before decoding), images per request/conversation.
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 4
    image_download_timeout_seconds: float = 30.0
    # PDFs (bot/pdf.py): pages read per PDF (each one image), bytes per PDF.
    max_pdf_pages: int = 4
    max_pdf_bytes: int = 20 * 1024 * 1024
    # Operating it (bot/storage.py, bot/quotas.py, bot/ops_server.py).
    data_dir: Path = DEFAULT_DATA_DIR
    daily_questions_per_user: int = 0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

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
            max_queue=env_int(env, "MAX_QUEUE", 32, minimum=1) or 32,
            max_pending_per_user=env_int(env, "MAX_PENDING_PER_USER", 2, minimum=1) or 2,
            user_cooldown_seconds=env_float(env, "USER_COOLDOWN_SECONDS", 0.0),
            generation_timeout_seconds=env_float(env, "GENERATION_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            allowed_guild_ids=env_ids(env, "ALLOWED_GUILD_IDS"),
            allowed_channel_ids=env_ids(env, "ALLOWED_CHANNEL_IDS"),
            allowed_role_ids=env_ids(env, "ALLOWED_ROLE_IDS"),
            allowed_user_ids=env_ids(env, "ALLOWED_USER_IDS"),
            blocked_user_ids=env_ids(env, "BLOCKED_USER_IDS"),
            allow_dms=env_bool(env, "ALLOW_DMS", True),
            shard_count=env_shards(env, "SHARD_COUNT"),
            max_image_bytes=env_int(env, "MAX_IMAGE_BYTES", 20 * 1024 * 1024, minimum=1) or 20 * 1024 * 1024,
            max_image_pixels=env_int(env, "MAX_IMAGE_PIXELS", 40_000_000, minimum=1) or 40_000_000,
            max_images=env_int(env, "MAX_IMAGES", 4, minimum=1) or 4,
            image_download_timeout_seconds=env_float(
                env, "IMAGE_DOWNLOAD_TIMEOUT_SECONDS", 30.0, minimum=0.1
            ),
            max_pdf_pages=env_int(env, "MAX_PDF_PAGES", 4, minimum=1) or 4,
            max_pdf_bytes=env_int(env, "MAX_PDF_BYTES", 20 * 1024 * 1024, minimum=1) or 20 * 1024 * 1024,
            data_dir=Path(env_str(env, "DATA_DIR", None) or DEFAULT_DATA_DIR).expanduser(),
            daily_questions_per_user=env_int(env, "DAILY_QUESTIONS_PER_USER", 0, minimum=0) or 0,
            metrics_port=env_int(env, "METRICS_PORT", None, minimum=1),
            metrics_host=env_str(env, "METRICS_HOST", "127.0.0.1") or "127.0.0.1",
        )
