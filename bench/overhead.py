"""Bot overhead: the same request through `python -m bot` and the fake Discord vs the engine alone.

End to end: from just before the simulated user's message is dispatched to the moment the
fake Discord stores the answer's final content (its `MessageWrite.at`; same process, same
`time.monotonic` clock), and to the first bot message in the thread (the first streamed
piece on screen). Engine alone: a `LocalEngine` in this process answering the same
question about the same picture, with the same settings. Runs alternate between the two so
slow phases of a shared machine hit both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fake_discord import FakeDiscord

from . import stats
from .model import BenchModel, chart_image, png_bytes, question, running_engine, timed_request

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_MS = 1000
BOT_START_TIMEOUT = 180.0
ANSWER_TIMEOUT = 120.0
TARGET_OVERHEAD_PERCENT = 5.0


@dataclass(frozen=True)
class OverheadConfig:
    runs: int
    max_new_tokens: int
    edit_interval: float = 1.0  # the bot's default STREAM_EDIT_INTERVAL_SECONDS


@dataclass(frozen=True)
class EndToEnd:
    total: float
    to_first_message: float
    content: str
    messages: int


def bot_env(fake: FakeDiscord, model: BenchModel, config: OverheadConfig) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DISCORD_TOKEN": fake.token,
        "DISCORD_API_BASE_URL": fake.api_base_url,
        "MODEL_ID": model.model_id,
        "DEVICE": model.device,
        "MAX_NEW_TOKENS": str(config.max_new_tokens),
        "STREAM_EDIT_INTERVAL_SECONDS": str(config.edit_interval),
        "LOG_LEVEL": "INFO",
    }


@contextlib.asynccontextmanager
async def running_bot(fake: FakeDiscord, env: dict[str, str]) -> AsyncIterator[Path]:
    """`python -m bot` against the fake, in a temp dir (no `.env` found); yields its log file."""
    workdir = Path(tempfile.mkdtemp(prefix="seebot-bench-bot-"))
    log_path = workdir / "bot.log"
    started = time.perf_counter()
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            cwd=workdir,
            env={"DATA_DIR": str(workdir / "data"), **env},  # not the user's own ~/.local/share/seebot
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                await fake.wait_until_ready(timeout=BOT_START_TIMEOUT, commands=["ask", "ocr", "compare"])
            except AssertionError:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the bot did not connect; its log ends:\n{tail}") from None
            log.info("bot connected in %.1f s (log: %s)", time.perf_counter() - started, log_path)
            yield log_path
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except asyncio.TimeoutError:
                    process.kill()
                    await process.wait()


async def ask_through_bot(fake: FakeDiscord, channel: int, text: str, image_png: bytes) -> EndToEnd:
    """One mention with the picture; times from the fake's own records (`time.monotonic`)."""
    writes_before = len(fake.message_writes)
    started = time.monotonic()
    message = await fake.send_message(
        fake.alice, channel, text, attachments=[("chart.png", image_png, "image/png")], mention_bot=True
    )
    thread = int(message["id"])

    def finished() -> list[dict[str, Any]] | None:
        # The answer is over when its first message has lost the Cancel button.
        messages = fake.bot_messages_in(thread)
        if messages and not messages[0].get("components"):
            return messages
        return None

    messages = await fake.wait_for(finished, ANSWER_TIMEOUT, description="the answer to end")
    final = messages[-1]
    final_id, final_content = int(final["id"]), str(final["content"])
    writes = [w for w in fake.message_writes[writes_before:] if w.channel_id == thread]
    first_at = min(w.at for w in writes)
    done_at = min(w.at for w in writes if w.message_id == final_id and w.content == final_content)
    return EndToEnd(
        total=done_at - started,
        to_first_message=first_at - started,
        content="\n".join(str(m["content"]) for m in messages),
        messages=len(messages),
    )


def _heartbeat_gaps_ms(times: list[float]) -> list[float]:
    return [(later - earlier) * 1000.0 for earlier, later in itertools.pairwise(times)]


async def measure_overhead(model: BenchModel, config: OverheadConfig) -> dict[str, Any]:
    image = chart_image()
    image_png = png_bytes(image)
    text = model.overhead_question
    engine_runs = []
    bot_runs: list[EndToEnd] = []
    async with FakeDiscord(heartbeat_interval_ms=HEARTBEAT_MS) as fake:
        env = bot_env(fake, model, config)
        async with (
            running_engine(model.settings(max_new_tokens=config.max_new_tokens)) as engine,
            running_bot(fake, env),
        ):
            channel = int((await fake.add_text_channel("bench"))["id"])
            # Warm-up: the bot's model loads in the background after it connects.
            warm = await timed_request(engine, question(text, image))
            warm_bot = await ask_through_bot(fake, channel, text, image_png)
            if warm_bot.content.strip() != warm.text.strip():
                log.warning(
                    "the bot's answer differs from the engine's: %r vs %r",
                    warm_bot.content[:200],
                    warm.text[:200],
                )
            heartbeats_from = len(fake.heartbeat_times)
            for run in range(config.runs):
                timed = await timed_request(engine, question(text, image))
                engine_runs.append(timed)
                through_bot = await ask_through_bot(fake, channel, text, image_png)
                bot_runs.append(through_bot)
                log.info(
                    "overhead run %d/%d: engine %.3f s, bot %.3f s (first message %.3f s)",
                    run + 1,
                    config.runs,
                    timed.total,
                    through_bot.total,
                    through_bot.to_first_message,
                )
            heartbeats = list(fake.heartbeat_times[heartbeats_from:])
    engine_total = [t.total for t in engine_runs]
    engine_first = [t.to_first_piece for t in engine_runs if t.to_first_piece is not None]
    bot_total = [r.total for r in bot_runs]
    bot_first = [r.to_first_message for r in bot_runs]
    engine_median = stats.median(engine_total)
    bot_median = stats.median(bot_total)
    overhead_s = bot_median - engine_median
    overhead_percent = 100.0 * overhead_s / engine_median
    gaps = _heartbeat_gaps_ms(heartbeats)
    return {
        "runs": config.runs,
        "question": text,
        "scripted_seconds": model.seconds_per_token * model.scripted_steps
        if model.seconds_per_token and model.scripted_steps
        else None,
        "stream_edit_interval_s": config.edit_interval,
        "answer_chars": len(engine_runs[0].text),
        "engine_alone_s": stats.summary(engine_total, (50, 95)),
        "engine_first_piece_s": stats.summary(engine_first, (50, 95)),
        "through_bot_s": stats.summary(bot_total, (50, 95)),
        "first_discord_message_s": stats.summary(bot_first, (50, 95)),
        "overhead_s": overhead_s,
        "overhead_percent": overhead_percent,
        "heartbeat_interval_ms": HEARTBEAT_MS,
        "heartbeat_gap_ms": stats.summary(gaps, (50, 99)) if gaps else None,
        "target_overhead_percent": TARGET_OVERHEAD_PERCENT,
        "target_met": overhead_percent < TARGET_OVERHEAD_PERCENT,
    }
