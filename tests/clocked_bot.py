"""`python -m tests.clocked_bot`: the bot, unmodified, with its UTC clock read from a file.

The file named by SEEBOT_TEST_CLOCK holds an ISO time ("2026-03-04T21:30:00+00:00"); a test
writes the next day into it to see daily quotas reset, without waiting for midnight.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import bot.quotas
from bot.__main__ import main


def clock() -> datetime.datetime:
    return datetime.datetime.fromisoformat(Path(os.environ["SEEBOT_TEST_CLOCK"]).read_text().strip())


if __name__ == "__main__":
    bot.quotas.utc_now = clock
    sys.exit(main())
