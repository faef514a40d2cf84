"""Starting the bot: settings a person gets wrong, and what they are told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.settings import COMPARE_PROMPT, BotSettings, MissingToken
from inference import SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_missing_token_is_a_one_line_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "DISCORD_TOKEN" in result.stderr and ".env.example" in result.stderr


def test_settings_defaults_and_overrides() -> None:
    settings = BotSettings.from_env({"DISCORD_TOKEN": "abc", "DEV_GUILD_ID": "123", "NUM_CROPS": "4"})
    assert settings.dev_guild_id == 123
    assert settings.compare_prompt == COMPARE_PROMPT
    assert settings.inference.num_crops == 4
    assert settings.inference.max_new_tokens == 1000
    assert "abc" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "DISCORD_TOKEN"),
        ({"DISCORD_TOKEN": "x", "MAX_NEW_TOKENS": "lots"}, "MAX_NEW_TOKENS must be a whole number"),
        ({"DISCORD_TOKEN": "x", "DEVICE": "tpu"}, "DEVICE must be"),
        ({"DISCORD_TOKEN": "x", "TEMPERATURE": "-1"}, "TEMPERATURE must be at least"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        BotSettings.from_env(env)


def test_missing_token_is_its_own_error() -> None:
    with pytest.raises(MissingToken):
        BotSettings.from_env({"DISCORD_TOKEN": "  "})
