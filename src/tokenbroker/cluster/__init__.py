"""Cluster mode's Redis: coalescing wake-ups, change fan-out and shared limits (never
correctness: the store decides, Redis only makes things faster)."""

from .breaker import Breaker, BreakerState
from .coordinator import RedisCoordinator, announce, channel_for, coordinator_for, windows_for
from .link import EXTRA_MISSING, RedisLink
from .windows import RedisWindows

__all__ = [
    "EXTRA_MISSING",
    "Breaker",
    "BreakerState",
    "RedisCoordinator",
    "RedisLink",
    "RedisWindows",
    "announce",
    "channel_for",
    "coordinator_for",
    "windows_for",
]
