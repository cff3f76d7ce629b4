"""A token bucket per connection: how many turns a client may send, and how fast.

Pure arithmetic on times the caller passes in (seconds, any monotonic clock), so it
needs no event loop and costs two float operations per turn.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst``.

    A client that re-sends its unacknowledged turns after a reconnect sends them at
    once: the burst must cover them.
    """

    rate: float
    burst: float
    tokens: float = -1.0
    """Tokens left; starts full."""
    stamp: float = 0.0
    """When :attr:`tokens` was last brought up to date."""

    def take(self, now: float) -> bool:
        """Spend one token at ``now``; ``False`` if none is left (the event breaks the limit)."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until the next token, after a refusal."""
        return max(0.0, (1.0 - self.tokens) / self.rate)
