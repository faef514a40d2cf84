"""Running `python -m bot` against the fake Discord, and what e2e tests share."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.fake_discord import FakeDiscord

ROOT = Path(__file__).resolve().parent.parent


def png(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    """An attachment as the fake Discord takes it."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return (name, buffer.getvalue(), "image/png")


class RunningBot:
    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, token: str) -> None:
        self.process = process
        self.log_path = log_path
        self.token = token

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def bot_env(fake: FakeDiscord, model_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DISCORD_TOKEN": fake.token,
        "DISCORD_API_BASE_URL": fake.api_base_url,
        "MODEL_ID": str(model_dir),
        "DEVICE": "cpu",
        "MAX_NEW_TOKENS": "4000",
        "STREAM_EDIT_INTERVAL_SECONDS": "0.3",
        "LOG_LEVEL": "INFO",
    }


async def start_bot(
    fake: FakeDiscord,
    model_dir: Path,
    workdir: Path,
    *,
    wait_for_model: bool = True,
    module: str = "bot",
    **settings: str,
) -> RunningBot:
    """The bot with the tiny model, `settings` added to its environment; returns once it has
    connected and registered its slash commands and (``wait_for_model``) shows itself online,
    which it does once the model is loaded and warmed up. ``module``: what `python -m` runs
    (``tests.clocked_bot``: the bot with a clock the test sets). Without ``wait_for_model``, a
    bot that exits before it is seen connected (a model that fails at once) is returned too,
    for the test to check its exit code; with it, that is an error that quotes the log."""
    log_path = workdir / "bot.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            cwd=workdir,
            env={**bot_env(fake, model_dir), "DATA_DIR": str(workdir / "seebot-data"), **settings},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    bot = RunningBot(process, log_path, fake.token)
    connected = asyncio.ensure_future(fake.wait_until_ready(timeout=60, commands=["ask", "ocr", "compare"]))
    exited = asyncio.ensure_future(process.wait())
    await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
    if not connected.done():
        connected.cancel()
        if wait_for_model:
            raise AssertionError(
                f"the bot exited ({process.returncode}) before connecting:\n{bot.log[-3000:]}"
            )
        return bot
    exited.cancel()
    connected.result()
    if wait_for_model:
        await fake.wait_for(
            lambda: fake.bot_presence.get("status") == "online", 60, description="the model to be ready"
        )
    return bot


async def stop(bot: RunningBot) -> None:
    """Stop the bot (SIGTERM) and check what every run must keep: no token in its log."""
    if bot.process.returncode is None:
        bot.process.terminate()
        await asyncio.wait_for(bot.process.wait(), 30)
    assert bot.token not in bot.log, "the token must never be logged"


async def new_channel(fake: FakeDiscord, name: str) -> int:
    return int((await fake.add_text_channel(name))["id"])


async def answer_in_thread(fake: FakeDiscord, message: dict, text: str, timeout: float = 30) -> list[dict]:
    """Waits for the thread made from `message` to hold a bot answer ending with `text`."""
    thread_id = int(message["id"])
    await fake.wait_for(lambda: thread_id in fake.threads, timeout, description="a thread from the question")

    def answered() -> list[dict] | None:
        messages = fake.bot_messages_in(thread_id)
        return messages if messages and messages[-1]["content"].endswith(text) else None

    return await fake.wait_for(answered, timeout, description=f"an answer ending {text!r}")
