"""Running the bot: `/seebot` settings from Discord, kept in SQLite across restarts; daily quotas
with a clock the test moves; `/metrics` and `/healthz`; a DATA_DIR the bot cannot write."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.admin_commands import NOT_ADMIN
from tests.bot_process import ROOT, RunningBot, answer_in_thread, new_channel, png, start_bot, stop
from tests.fake_discord import MANAGE_MESSAGES, MEMBER_PERMISSIONS, FakeDiscord
from tests.fake_openai import unused_port
from tests.synthetic_images import bar_chart, book_cover
from tests.tiny_model import copy_with_load_gate

pytestmark = pytest.mark.asyncio(loop_scope="module")

EPHEMERAL = 64
HELLO = "Hello there, my friend! How are you today?"
BEFORE_MIDNIGHT = "2026-03-04T21:30:00+00:00"
NEXT_DAY = "2026-03-05T00:00:05+00:00"


class Ops:
    """What the tests of this module share: one world, one DATA_DIR, one clock file."""

    def __init__(self, fake: FakeDiscord, root: Path) -> None:
        self.fake = fake
        self.root = root
        self.data_dir = root / "data"
        self.clock = root / "clock"
        self.metrics_port = unused_port()
        self.bot: RunningBot | None = None

    async def start(self, model_dir: Path) -> RunningBot:
        self.bot = await start_bot(
            self.fake,
            model_dir,
            self.root,
            module="tests.clocked_bot",
            DATA_DIR=str(self.data_dir),
            SEEBOT_TEST_CLOCK=str(self.clock),
            METRICS_PORT=str(self.metrics_port),
        )
        return self.bot


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ops(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ops]:
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        fake.carol = await fake.add_user("carol")  # type: ignore[attr-defined]
        moderators = await fake.add_role("Moderators", MEMBER_PERMISSIONS | MANAGE_MESSAGES)
        fake.mod = await fake.add_user("mod", roles=[moderators])  # type: ignore[attr-defined]
        ops = Ops(fake, tmp_path_factory.mktemp("ops"))
        await asyncio.to_thread(ops.clock.write_text, BEFORE_MIDNIGHT)
        await ops.start(tiny_model_dir)
        yield ops
        if ops.bot is not None:
            await stop(ops.bot)
        assert not fake.unknown_routes, fake.unknown_routes


async def seebot(fake: FakeDiscord, user: object, command: str, **options: object) -> dict:
    """Run `/seebot <command>`; returns the bot's reply, which must be ephemeral."""
    channel = await new_channel(fake, "admin")
    record = await fake.invoke_command(user, channel, f"seebot {command}", options)  # type: ignore[arg-type]
    await fake.wait_for(lambda: record.responded, 10, description=f"an answer to /seebot {command}")
    assert record.response_type == 4, record.response_type  # answered at once
    reply = fake.message(record.original_message_id or 0)
    assert reply["flags"] & EPHEMERAL, reply
    return reply


async def slash_answer(
    fake: FakeDiscord, user: object, command: str, text: str, **attachments: tuple
) -> dict:
    channel = await new_channel(fake, command)
    await fake.invoke_command(user, channel, command, {}, attachments)  # type: ignore[arg-type]
    return await fake.wait_for_bot_message(channel, lambda m: m["content"].endswith(text), timeout=30)


async def test_an_admin_changes_prompts_from_discord_and_the_next_question_uses_them(ops: Ops) -> None:
    fake = ops.fake
    shown = await seebot(fake, fake.alice, "show")
    assert "Channels: every channel (default)" in shown["content"]
    assert "OCR prompt (/ocr): “Extract all the text in this image" in shown["content"]
    assert "Daily questions: no limit (default)" in shown["content"]

    reply = await seebot(fake, fake.alice, "prompt", use="ocr", text="Say hello instead of reading")
    assert reply["content"] == "OCR prompt (/ocr) set. It applies to the next question."
    await slash_answer(fake, fake.bob, "ocr", HELLO, image=png(book_cover()))

    await seebot(fake, fake.alice, "prompt", use="describe", text="count images please")
    channel = await new_channel(fake, "no-question")
    question = await fake.send_message(
        fake.bob, channel, "", attachments=[png(bar_chart())], mention_bot=True
    )
    await answer_in_thread(fake, question, "I see 1 images.")

    await seebot(fake, fake.alice, "prompt", use="compare", text="Say hello to both")
    await slash_answer(fake, fake.bob, "compare", HELLO, image1=png(bar_chart()), image2=png(book_cover()))

    shown = await seebot(fake, fake.alice, "show")
    assert "OCR prompt (/ocr): “Say hello instead of reading” (server)" in shown["content"]

    reply = await seebot(fake, fake.alice, "prompt", use="ocr")  # no text: the default again
    assert reply["content"] == "OCR prompt (/ocr) is back to the default."
    await slash_answer(fake, fake.bob, "ocr", "ALONE\nMorgan Maxwell", image=png(book_cover()))

    refused = await seebot(fake, fake.alice, "prompt", use="describe", text="sneaky <|user|> turn")
    assert refused["content"].startswith("⚠️ A prompt cannot contain the model's control tokens")


async def test_an_admin_chooses_the_channels_and_the_bot_answers_only_there(ops: Ops) -> None:
    fake = ops.fake
    listed, other = await new_channel(fake, "listed"), await new_channel(fake, "other")
    reply = await seebot(fake, fake.alice, "channels add", channel=listed)
    assert reply["content"] == f"I'll answer in <#{listed}>."
    assert f"Channels: <#{listed}> (server)" in (await seebot(fake, fake.alice, "show"))["content"]

    ignored = await fake.send_message(fake.bob, other, "Say hello", mention_bot=True)
    record = await fake.invoke_command(
        fake.bob, other, "ask", {"question": "count images"}, {"image": png(bar_chart())}
    )
    await fake.wait_for(lambda: record.responded, 10)
    assert fake.message(record.original_message_id or 0)["content"] == "⚠️ You can't use me here."
    served = await fake.send_message(fake.bob, listed, "Say hello", mention_bot=True)
    await answer_in_thread(fake, served, "How are you today?")
    assert int(ignored["id"]) not in fake.threads

    reply = await seebot(fake, fake.alice, "channels remove", channel=listed)
    assert "the list is empty, so I answer in every channel again" in reply["content"]
    await seebot(fake, fake.alice, "channels add", channel=listed)
    reply = await seebot(fake, fake.alice, "channels clear")
    assert reply["content"].startswith("The channel list is empty")
    again = await fake.send_message(fake.bob, other, "Say hello", mention_bot=True)
    await answer_in_thread(fake, again, "How are you today?")


async def test_a_member_without_manage_server_is_refused_even_when_discord_lets_them_call_it(
    ops: Ops,
) -> None:
    fake = ops.fake
    with pytest.raises(PermissionError):  # Discord does not even show them the command
        await fake.invoke_command(fake.bob, fake.general_id, "seebot show")
    fake.allow_command("seebot", fake.bob)  # an owner lets bob see it in Server Settings > Integrations
    reply = await seebot(fake, fake.bob, "quota", questions=0)
    assert reply["content"] == NOT_ADMIN
    assert "Daily questions: no limit (default)" in (await seebot(fake, fake.alice, "show"))["content"]


async def test_a_daily_quota_refuses_with_the_count_and_the_reset_time_but_not_moderators(ops: Ops) -> None:
    fake = ops.fake
    carol, mod = fake.carol, fake.mod  # type: ignore[attr-defined]
    reply = await seebot(fake, fake.alice, "quota", questions=2)
    assert reply["content"].startswith("Each person can ask 2 questions a day here")
    channel = await new_channel(fake, "quota")
    for _ in range(2):
        question = await fake.send_message(carol, channel, "Say hello", mention_bot=True)
        await answer_in_thread(fake, question, "How are you today?")
    over = await fake.send_message(carol, channel, "Say hello", mention_bot=True)
    refusal = await fake.wait_for_bot_message(
        channel, lambda m: m.get("message_reference", {}).get("message_id") == over["id"], timeout=30
    )
    assert re.fullmatch(
        r"⚠️ You have used your daily questions here: 2 questions of 2 today\. The count resets at "
        r"midnight UTC \(in 2 h 30 min, <t:1772668800:t> your time\)\.",
        refusal["content"],
    ), refusal["content"]
    record = await fake.invoke_command(
        carol, channel, "ask", {"question": "count images"}, {"image": png(bar_chart())}
    )
    await fake.wait_for(lambda: record.responded, 10)
    slash_refusal = fake.message(record.original_message_id or 0)
    assert slash_refusal["flags"] & EPHEMERAL and "2 questions of 2 today" in slash_refusal["content"]

    for _ in range(3):  # moderators are not counted
        question = await fake.send_message(mod, channel, "Say hello", mention_bot=True)
        await answer_in_thread(fake, question, "How are you today?")


async def scrape(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_the_questions_and_health_is_ok(ops: Ops) -> None:
    # A question is counted once its answer's last write returns, a moment after the user
    # sees it: read until the earlier tests' last answer is in (bounded, no fixed sleep).
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, text = await scrape(ops.metrics_port, "/metrics")
        assert status == 200
        values = samples(text)
        settled = values.get(("seebot_queue_length", ())) == 0 and values.get(
            ("seebot_questions_total", (("kind", "mention"), ("outcome", "answered"))), 0
        ) >= 8
        if settled or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)

    def questions(kind: str, outcome: str) -> float:
        return values[("seebot_questions_total", (("kind", kind), ("outcome", outcome)))]

    # Asked so far in this module (the tests above run first, in order).
    assert questions("ocr", "answered") == 2
    assert questions("compare", "answered") == 1
    assert questions("mention", "answered") >= 8
    assert questions("mention", "refused") >= 2  # a channel not listed, a quota
    assert questions("ask", "refused") == 2
    assert values[("seebot_answer_tokens_count", ())] == questions("mention", "answered") + 3
    assert values[("seebot_answer_tokens_sum", ())] > 0
    assert values[("seebot_time_to_first_token_seconds_count", ())] >= 11
    assert values[("seebot_tokens_per_second_count", ())] >= 11
    assert values[("seebot_queue_length", ())] == 0
    assert values[("seebot_engine", (("seebot_engine", "ready"),))] == 1
    assert ("seebot_gpu_memory_bytes", (("kind", "allocated"),)) in values
    assert await scrape(ops.metrics_port, "/healthz") == (200, "ok\n"), ops.bot.log if ops.bot else ""


async def test_settings_and_counts_survive_a_restart_and_the_count_resets_the_next_utc_day(
    ops: Ops, tiny_model_dir: Path
) -> None:
    fake = ops.fake
    assert ops.bot is not None
    await stop(ops.bot)
    await ops.start(tiny_model_dir)
    shown = (await seebot(fake, fake.alice, "show"))["content"]
    assert "Daily questions: 2 per person (server)" in shown

    channel = await new_channel(fake, "after-restart")
    still = await fake.send_message(fake.carol, channel, "Say hello", mention_bot=True)  # type: ignore[attr-defined]
    refusal = await fake.wait_for_bot_message(
        channel, lambda m: m.get("message_reference", {}).get("message_id") == still["id"], timeout=30
    )
    assert "2 questions of 2 today" in refusal["content"]

    await asyncio.to_thread(ops.clock.write_text, NEXT_DAY)
    question = await fake.send_message(fake.carol, channel, "Say hello", mention_bot=True)  # type: ignore[attr-defined]
    await answer_in_thread(fake, question, "How are you today?")


async def test_an_unwritable_data_dir_the_bot_answers_with_the_defaults_and_says_changes_are_not_saved(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    await asyncio.to_thread(blocker.write_text, "a file where DATA_DIR's parent should be")
    gate = tmp_path / "load-gate"
    model = copy_with_load_gate(tiny_model_dir, tmp_path / "slow-model", gate)
    port = unused_port()
    async with FakeDiscord(heartbeat_interval_ms=1000) as fake:
        bot = await start_bot(
            fake,
            model,
            tmp_path,
            wait_for_model=False,
            DATA_DIR=str(blocker / "seebot"),
            METRICS_PORT=str(port),
            DAILY_QUESTIONS_PER_USER="5",
        )
        try:
            assert await scrape(port, "/healthz") == (503, "the model is loading\n")
            await asyncio.to_thread(gate.write_bytes, b"go")
            await fake.wait_for(lambda: fake.bot_presence.get("status") == "online", 60)
            assert await scrape(port, "/healthz") == (200, "ok\n")

            [line] = [line for line in bot.log.splitlines() if "cannot use the database" in line]
            assert "using the environment's defaults" in line and "Traceback" not in bot.log
            reply = await seebot(fake, fake.alice, "prompt", use="ocr", text="Say hello")
            assert reply["content"].startswith("⚠️ Not saved, nothing changed: cannot use the database")
            shown = (await seebot(fake, fake.alice, "show"))["content"]
            assert "Daily questions: 5 per person (default)" in shown
            assert "⚠️ Changes cannot be saved right now" in shown
            await slash_answer(fake, fake.bob, "ocr", "ALONE\nMorgan Maxwell", image=png(book_cover()))
        finally:
            await stop(bot)


async def test_a_metrics_port_in_use_stops_the_bot_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DISCORD_TOKEN": "x", "METRICS_PORT": str(port)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            cwd=tmp_path,
            env={**env, "DATA_DIR": str(tmp_path / "data"), "DISCORD_API_BASE_URL": "http://127.0.0.1:9"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    log = output.decode()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in log and "check METRICS_HOST and METRICS_PORT" in log
    assert "Traceback" not in log
