"""`python -m bot`: run the Discord bot with the settings from the environment and `.env`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import discord
from dotenv import find_dotenv, load_dotenv

from inference import SettingsError, create_engine

from .client import create_bot
from .discord_api import use_api_base
from .ops_server import OpsServer
from .settings import BotSettings

log = logging.getLogger("bot")


async def run(settings: BotSettings) -> int:
    if settings.api_base_url:
        use_api_base(settings.api_base_url)
    bot = create_bot(settings, create_engine(settings.inference))
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # a reference keeps the task alive
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no signal handlers
            loop.add_signal_handler(
                signal_number, lambda: stopping.append(asyncio.create_task(bot.shutdown()))
            )
    ops = None
    if settings.metrics_port is not None:
        ops = OpsServer(
            settings.metrics_host, settings.metrics_port, bot.metrics.registry, bot.health_problem
        )
        try:
            await ops.start()
        except OSError as error:
            log.error(
                "cannot serve metrics on %s:%d (%s): check METRICS_HOST and METRICS_PORT",
                settings.metrics_host,
                settings.metrics_port,
                error,
            )
            return 1
    async with bot:
        try:
            await bot.start(settings.token)
        except discord.LoginFailure as error:
            log.error("Discord refused the token (%s): check DISCORD_TOKEN in .env", error)
            return 1
        finally:
            if ops is not None:
                await ops.close()
    await asyncio.gather(*stopping)  # a signal's shutdown: let it finish closing everything
    log.info("stopped")
    return bot.exit_code


def main() -> int:
    load_dotenv(find_dotenv(usecwd=True))  # the .env of the directory you run it from
    try:
        settings = BotSettings.from_env()
    except SettingsError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
