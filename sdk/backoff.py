"""How long to wait before trying again: capped exponential delays, optionally jittered.

    backoff = Backoff(initial=0.5, maximum=5.0, jitter=0.5)
    while True:
        try:
            return call()
        except Unavailable:
            await asyncio.sleep(backoff.next())   # 0.25-0.5 s, 0.5-1 s, ... 2.5-5 s, 2.5-5 s
    ...
    backoff.reset()                               # it worked: start again from ``initial``

A :class:`Backoff` only counts and computes; it never reads a clock or sleeps,
so callers wait however suits them (``asyncio.sleep``, ``Event.wait``, a due
time on an injected clock) and tests check the delays without waiting for them.
:meth:`Backoff.delay` gives the nominal delay of any attempt, for callers that
keep the count themselves.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``initial``, then each ``multiplier`` times the one before, never more
    than ``maximum``. With ``jitter`` (a fraction from 0 to 1) each delay is drawn
    between ``1 - jitter`` times and all of the nominal one, from ``rng``, so clients
    that failed together do not come back in step."""

    __slots__ = ("_attempts", "_rng", "initial", "jitter", "maximum", "multiplier")

    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.multiplier = float(multiplier)
        self.jitter = float(jitter)
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"a backoff needs 0 < initial <= maximum, not {self.initial} and {self.maximum}"
            )
        if self.multiplier < 1:
            raise ValueError(f"a backoff's multiplier must be at least 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"a backoff's jitter must be between 0 and 1, not {self.jitter}")
        self._rng = rng if rng is not None else random.Random()
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """How many delays :meth:`next` has given since the start or the last :meth:`reset`."""
        return self._attempts

    def delay(self, attempt: int) -> float:
        """The nominal (unjittered) delay before retry number ``attempt``, counted from 0."""
        if attempt < 0:
            raise ValueError(f"attempt must be 0 or more, not {attempt}")
        try:
            return min(self.maximum, self.initial * self.multiplier**attempt)
        except OverflowError:  # long past the cap
            return self.maximum

    def next(self) -> float:
        """The delay before the next retry; each call counts one more attempt."""
        nominal = self.delay(self._attempts)
        self._attempts += 1
        if not self.jitter:
            return nominal
        return nominal * self._rng.uniform(1 - self.jitter, 1.0)

    def reset(self) -> None:
        """The call worked: the next delay is ``initial`` again."""
        self._attempts = 0

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, maximum={self.maximum}, "
            f"multiplier={self.multiplier}, jitter={self.jitter}, attempts={self._attempts})"
        )
