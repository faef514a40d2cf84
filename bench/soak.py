"""A soak run: `python -m bot` with the tiny model through the fake Discord, as a busy server.

Users ask questions in their own channels, in a seeded random mix: mentions (some with an
image), follow-ups sent while the first answer still waits or streams, /ask, bad images,
answers cancelled with the button, threads and questions deleted mid-answer; meanwhile
Discord answers a share of every REST call the bot makes with a 429 or a 502. Then it checks
what the people saw: every question got exactly one final answer or one clear refusal
(a withdrawn question: at most one), no answer appeared twice or merged two questions, no
status was left "waiting", no traceback was logged, heartbeats stayed on time, and the bot's
memory stopped growing (its RSS after the second half of the run against after the first).

Each answer says which question it answers (the scripted replies repeat the question), so
doubles and merged turns are visible in the text alone.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tests.bot_process import RunningBot, start_bot, stop
from tests.fake_discord import FakeDiscord, FakeDiscordTimeout

from . import stats

log = logging.getLogger(__name__)

HEARTBEAT_MS = 1000
# Scripted replies that repeat the question (the same rules are in tests/conftest.py SCRIPT).
SOAK_SCRIPT: list[dict[str, Any]] = [
    {"when": "what do you see", "reply": "I see {images} images. You asked: {question}"},
    {"when": "tell me slowly", "reply": "Slowly, about {question}.", "seconds_per_token": 0.03},
]
KINDS = {  # scenario -> weight
    "mention": 24,
    "mention with image": 10,
    "follow-up while waiting": 14,
    "slash /ask": 14,
    "bad image": 8,
    "cancelled": 10,
    "thread deleted": 8,
    "question deleted": 12,
}
# "On time": no beat missed, i.e. no gap of two intervals (the fake's own loop, on shared
# cores, delays a beat's arrival by a few hundred ms now and then).
TARGET_HEARTBEAT_GAP_S = 2 * HEARTBEAT_MS / 1000
TARGET_GROWTH_MIB = 16.0
INFORMATIONAL = ("⚠️ Discord did not take",)  # a notice before an answer, not its end


@dataclass(frozen=True)
class SoakConfig:
    users: int
    questions: int
    think_seconds: tuple[float, float]  # pause between one user's scenarios
    failure_rate: float  # share of REST calls answered 429 or 502
    seed: int = 11
    settle_seconds: float = 90.0


@dataclass
class Scenario:
    kind: str
    user: dict[str, Any]
    channel: int
    questions: list[str] = field(default_factory=list)  # the texts asked, in order
    first_message: int | None = None  # the first question's message (its thread's id)
    withdrawn: bool = False  # a question deleted or its thread deleted


def _answer_marker(text: str) -> str:
    return f"Slowly, about {text}." if text.startswith("tell me slowly") else f"You asked: {text}"


def _answered_text(content: str) -> str | None:
    """The question an answer says it answers, or None for anything else."""
    if "You asked: " in content:
        return content.split("You asked: ", 1)[1]
    if content.startswith("Slowly, about "):
        return content.removeprefix("Slowly, about ").removesuffix(".")
    return None


def _bad_image() -> tuple[str, bytes, str]:
    return ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00not really a picture" * 20, "image/png")


def _picture(seed: int) -> tuple[str, bytes, str]:
    image = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, 120))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return ("picture.png", buffer.getvalue(), "image/png")


class Soak:
    """Drives the users, then reads back what the fake Discord holds."""

    def __init__(self, fake: FakeDiscord, bot: RunningBot, config: SoakConfig) -> None:
        self.fake = fake
        self.bot = bot
        self.config = config
        self.random = random.Random(config.seed)
        self.scenarios: list[Scenario] = []
        self.asked = 0
        self.rss_mib: list[tuple[float, float]] = []  # (seconds since start, RSS)

    def _next_text(self, slow: bool) -> str | None:
        if self.asked >= self.config.questions:
            return None
        self.asked += 1
        return f"{'tell me slowly' if slow else 'what do you see'} q{self.asked}"

    async def run(self) -> dict[str, Any]:
        fake = self.fake
        users = [fake.alice, fake.bob] + [
            await fake.add_user(f"user{n}") for n in range(max(0, self.config.users - 2))
        ]
        started = time.monotonic()
        beats_before = len(fake.heartbeat_times)
        sampler = asyncio.create_task(self._sample_memory(started))
        fake.fail_at_random(self.config.failure_rate, seed=self.config.seed)
        half = self.config.questions // 2
        halfway_rss: float | None = None
        try:
            await asyncio.gather(*(self._user(user) for user in users[: self.config.users]))
            load_seconds = time.monotonic() - started
            await self._settle()
            fake.fail_at_random(0)
        finally:
            sampler.cancel()
        halfway = [rss for at, rss in self.rss_mib if at <= load_seconds / 2]
        halfway_rss = halfway[-1] if halfway else None
        final_rss = _rss_mib(self.bot.process.pid)
        checks = self._check()
        beats = fake.heartbeat_times[beats_before:]
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        gap = stats.summary(gaps, (50, 99)) if gaps else {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
        bot_log = self.bot.log
        log_problems = {
            "tracebacks": bot_log.count("Traceback"),
            "ignored exceptions": bot_log.count("Ignoring exception"),
            "unclosed sessions": bot_log.count("Unclosed client session"),
            "object reprs": bot_log.count(" object at 0x"),
        }
        growth = None if halfway_rss is None or final_rss is None else final_rss - halfway_rss
        result = {
            "users": self.config.users,
            "questions": self.asked,
            "half": half,
            "seconds": load_seconds,
            "failure_rate": self.config.failure_rate,
            "injected_failures": _count_statuses(fake.injected_failures),
            "scenarios": _count([s.kind for s in self.scenarios]),
            **checks,
            "log_problems": log_problems,
            "heartbeat_gap_s": gap,
            "rss_mib": {"halfway": halfway_rss, "end": final_rss, "growth": growth},
        }
        result["passed"] = (
            not result["failures"]
            and not any(log_problems.values())
            and gap["max"] < TARGET_HEARTBEAT_GAP_S
            and (growth is None or growth <= TARGET_GROWTH_MIB)
        )
        return result

    async def _sample_memory(self, started: float) -> None:
        while True:
            rss = _rss_mib(self.bot.process.pid)
            if rss is not None:
                self.rss_mib.append((time.monotonic() - started, rss))
            await asyncio.sleep(1.0)

    async def _user(self, user: dict[str, Any]) -> None:
        kinds, weights = zip(*KINDS.items(), strict=True)
        while self.asked < self.config.questions:
            kind = self.random.choices(kinds, weights)[0]
            channel = int((await self.fake.add_text_channel(f"soak-{len(self.scenarios)}"))["id"])
            scenario = Scenario(kind, user, channel)
            self.scenarios.append(scenario)
            try:
                await self._play(scenario)
            except FakeDiscordTimeout as error:  # the checks below say what was missing
                log.warning("soak: %s in channel %s: %s", kind, channel, str(error).splitlines()[0])
            await asyncio.sleep(self.random.uniform(*self.config.think_seconds))

    async def _ask(self, scenario: Scenario, text: str, **kwargs: Any) -> dict[str, Any]:
        scenario.questions.append(text)
        message = await self.fake.send_message(
            scenario.user, scenario.channel, text, mention_bot=True, **kwargs
        )
        if scenario.first_message is None:
            scenario.first_message = int(message["id"])
        return message

    async def _first_bot_message(self, scenario: Scenario, timeout: float = 30) -> dict[str, Any]:
        thread = scenario.first_message
        assert thread is not None
        return await self.fake.wait_for_bot_message(thread, timeout=timeout)

    async def _play(self, scenario: Scenario) -> None:
        fake, kind = self.fake, scenario.kind
        slow = (
            kind in ("cancelled", "thread deleted", "follow-up while waiting") or self.random.random() < 0.3
        )
        text = self._next_text(slow)
        if text is None:
            self.scenarios.remove(scenario)
            return
        if kind == "slash /ask":
            scenario.questions.append(text)
            await fake.invoke_command(
                scenario.user, scenario.channel, "ask", {"question": text}, {"image": _picture(self.asked)}
            )
        elif kind == "mention with image":
            await self._ask(scenario, text, attachments=[_picture(self.asked)])
        elif kind == "bad image":
            await self._ask(scenario, text, attachments=[_bad_image()])
        elif kind == "follow-up while waiting":
            await self._ask(scenario, text)
            await self._first_bot_message(scenario)  # a status or the first text
            follow_up = self._next_text(self.random.random() < 0.5)
            if follow_up is not None:
                scenario.questions.append(follow_up)
                assert scenario.first_message is not None
                await fake.send_message(scenario.user, scenario.first_message, follow_up)
        elif kind == "cancelled":
            await self._ask(scenario, text)
            first = await self._first_bot_message(scenario)
            buttons = fake.buttons_on(int(first["id"]))
            if buttons:  # else the answer was over already
                try:
                    await fake.click_button(scenario.user, int(first["id"]), buttons[0]["custom_id"])
                except (LookupError, ValueError) as error:  # gone meanwhile: the answer ended
                    log.info("soak: no Cancel to press in channel %s: %s", scenario.channel, error)
        elif kind == "thread deleted":
            await self._ask(scenario, text)
            await self._first_bot_message(scenario)
            scenario.withdrawn = True
            assert scenario.first_message is not None
            if scenario.first_message in fake.threads:
                await fake.delete_thread(scenario.first_message)
        elif kind == "question deleted":
            message = await self._ask(scenario, text)
            await asyncio.sleep(self.random.uniform(0.0, 1.0))
            scenario.withdrawn = True
            await fake.delete_message(int(message["id"]))
        else:
            await self._ask(scenario, text)

    def _messages_of(self, scenario: Scenario) -> list[dict[str, Any]]:
        messages = self.fake.bot_messages_in(scenario.channel)
        if scenario.first_message is not None and scenario.first_message in self.fake.threads:
            messages += self.fake.bot_messages_in(scenario.first_message)
        return messages

    def _outcomes(self, scenario: Scenario) -> tuple[dict[str, int], int, list[str]]:
        """Answers per question text, final notices, and what looks wrong (merged, waiting)."""
        answers = dict.fromkeys(scenario.questions, 0)
        notices = 0
        problems = []
        for message in self._messages_of(scenario):
            content = message["content"]
            answered = _answered_text(content)
            if content.startswith("⏳"):
                problems.append(f"left waiting: {content!r}")
            elif content.startswith("⚠️"):
                if not content.startswith(INFORMATIONAL):
                    notices += 1
            elif answered is not None:
                if answered in answers and content.endswith(_answer_marker(answered)):
                    answers[answered] += 1
                elif not any(q.startswith(answered) for q in answers):  # cut short is fine
                    problems.append(f"an answer to no one question: {content!r}")
        return answers, notices, problems

    def _settled(self) -> bool:
        return all(not self._missing(s) for s in self.scenarios)

    def _missing(self, scenario: Scenario) -> bool:
        answers, notices, _ = self._outcomes(scenario)
        if scenario.withdrawn:
            return False
        return sum(answers.values()) + notices < len(scenario.questions)

    async def _settle(self) -> None:
        """Wait until every question has its outcome (or settle_seconds), then for quiet."""
        try:
            await self.fake.wait_for(self._settled, self.config.settle_seconds, description="every outcome")
        except FakeDiscordTimeout:
            log.warning("soak: some questions have no outcome after %.0f s", self.config.settle_seconds)
        while True:  # no writes for 2 s: late doubles would show now
            writes = len(self.fake.message_writes)
            await asyncio.sleep(2.0)
            if len(self.fake.message_writes) == writes:
                return

    def _check(self) -> dict[str, Any]:
        failures: list[str] = []
        outcome_counts = {"answered": 0, "refused or told": 0, "withdrawn": 0, "cancelled": 0}
        for scenario in self.scenarios:
            answers, notices, problems = self._outcomes(scenario)
            where = f"{scenario.kind} in channel {scenario.channel}"
            failures += [f"{where}: {p}" for p in problems]
            for text, count in answers.items():
                if count > 1:
                    failures.append(f"{where}: {text!r} answered {count} times")
            answered = sum(1 for count in answers.values() if count)
            total = answered + notices
            if scenario.withdrawn:
                outcome_counts["withdrawn"] += len(scenario.questions)
                if total > len(scenario.questions):
                    failures.append(f"{where}: {total} outcomes for a withdrawn question")
                continue
            if total != len(scenario.questions):
                failures.append(
                    f"{where}: {len(scenario.questions)} question(s), {answered} answered, {notices} notices"
                )
            outcome_counts["answered"] += answered
            outcome_counts["refused or told"] += notices
            outcome_counts["cancelled"] += sum(
                1 for m in self._messages_of(scenario) if m["content"].startswith("⚠️ Cancelled by")
            )
        return {"outcomes": outcome_counts, "failures": failures}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _count(items: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item)] = counts.get(str(item), 0) + 1
    return counts


def _count_statuses(failures: Sequence[tuple[str, int]]) -> dict[str, int]:
    return _count([status for _, status in failures])


async def soak_with_bot(fake: FakeDiscord, bot: RunningBot, config: SoakConfig) -> dict[str, Any]:
    """The soak against a bot already running on `fake` (the suite's short version uses this)."""
    return await Soak(fake, bot, config).run()


async def measure_soak(model_dir: Path | None, config: SoakConfig) -> dict[str, Any]:
    """Build the tiny model (unless given), start the bot on a fresh fake Discord, soak it."""
    workdir = Path(tempfile.mkdtemp(prefix="seebot-soak-"))
    if model_dir is None:
        from tests.tiny_model import build_tiny_model

        model_dir = build_tiny_model(workdir / "tiny", script=SOAK_SCRIPT)
    async with FakeDiscord(heartbeat_interval_ms=HEARTBEAT_MS) as fake:
        bot = await start_bot(fake, model_dir, workdir)
        try:
            result = await soak_with_bot(fake, bot, config)
        finally:
            await stop(bot)
        problems = result["log_problems"]
        problems["unclosed sessions"] = bot.log.count("Unclosed client session")  # shutdown included
        problems["tracebacks"] = bot.log.count("Traceback")
    result["bot_log"] = str(bot.log_path)
    return result


def soak_table(result: dict[str, Any]) -> str:
    outcomes = result["outcomes"]
    gap = result["heartbeat_gap_s"]
    rss = result["rss_mib"]
    injected = ", ".join(f"{n} x {status}" for status, n in sorted(result["injected_failures"].items()))
    growth = "n/a" if rss["growth"] is None else f"{rss['growth']:+.1f} MiB"
    rows = [
        ["questions (users)", f"{result['questions']} ({result['users']})"],
        ["load phase", f"{result['seconds']:.0f} s"],
        ["scenarios", ", ".join(f"{k}: {v}" for k, v in sorted(result["scenarios"].items()))],
        ["Discord failures injected", f"{injected or 'none'} ({result['failure_rate']:.0%} of REST calls)"],
        ["answered exactly once", str(outcomes["answered"])],
        [
            "refused or told (one notice)",
            f"{outcomes['refused or told']} ({outcomes['cancelled']} cancelled)",
        ],
        ["withdrawn (deleted / thread deleted)", str(outcomes["withdrawn"])],
        ["lost, doubled, merged or left waiting", str(len(result["failures"]))],
        [
            "tracebacks / ignored exceptions in the log",
            f"{result['log_problems']['tracebacks']} / {result['log_problems']['ignored exceptions']}",
        ],
        [
            "unclosed sessions / object reprs in the log",
            f"{result['log_problems']['unclosed sessions']} / {result['log_problems']['object reprs']}",
        ],
        [
            "heartbeat gap p99 / max",
            f"{gap['p99']:.2f} s / {gap['max']:.2f} s (every {HEARTBEAT_MS} ms; a miss: "
            f">= {TARGET_HEARTBEAT_GAP_S:g} s)",
        ],
        ["bot RSS halfway -> end", f"{rss['halfway'] or 0:.0f} -> {rss['end'] or 0:.0f} MiB ({growth})"],
        ["verdict", "passed" if result["passed"] else "FAILED"],
    ]
    lines = ["| check | result |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    body = "\n".join(lines)
    if result["failures"]:
        body += "\n\nFirst failures:\n" + "\n".join(f"- {f}" for f in result["failures"][:10])
    return "### Soak (`python -m bot` + fake Discord with injected 429/502, tiny model)\n\n" + body


def soak_target_line(result: dict[str, Any]) -> str:
    verdict = "met" if result["passed"] else "NOT met"
    return (
        f"- Soak: {result['questions']} questions, every one answered once, refused once or withdrawn, "
        f"no traceback, heartbeats on time, memory flat: {verdict}"
    )
