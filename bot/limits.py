"""Fair use: a bounded number of questions in flight, a few per person, and a cooldown.

The refusals are worded for the person who asked; each is a reply, never silence.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .settings import BotSettings
from .texts import already_waiting, busy, slow_down


class Refused(Exception):
    """The request is not taken; the message says why and what to do."""


class RequestGate:
    def __init__(self, settings: BotSettings) -> None:
        self._max_queue = settings.max_queue
        self._max_per_user = settings.max_pending_per_user
        self._cooldown = settings.user_cooldown_seconds
        self._in_flight = 0
        self._per_user: collections.Counter[int] = collections.Counter()
        self._last_request: dict[int, float] = {}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def admit(self, user_id: int) -> Iterator[None]:
        """Hold a place for one request while the block runs, or raise `Refused`."""
        now = time.monotonic()
        pending = self._per_user[user_id]
        if pending >= self._max_per_user:
            raise Refused(already_waiting(pending))
        if self._cooldown and now - self._last_request.get(user_id, -math.inf) < self._cooldown:
            wait = math.ceil(self._cooldown - (now - self._last_request[user_id]))
            raise Refused(slow_down(wait))
        if self._in_flight >= self._max_queue:
            raise Refused(busy(self._in_flight))
        self._in_flight += 1
        self._per_user[user_id] += 1
        self._last_request[user_id] = now
        try:
            yield
        finally:
            self._in_flight -= 1
            self._per_user[user_id] -= 1
            if not self._per_user[user_id]:
                del self._per_user[user_id]
