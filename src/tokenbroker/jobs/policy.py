"""What a job does when an item fails, and how a job ends from its items.

Every failure falls in one of two classes (:func:`classify`):

- **transient** — it may pass if tried again: timeouts, 429, 5xx, network errors, a busy
  store (:class:`~tokenbroker.errors.ProviderUnavailableError`, :class:`TimeoutError`,
  :class:`ConnectionError`, :class:`~tokenbroker.errors.StoreError`). The item is tried
  again after an exponential backoff with full jitter, at most
  :attr:`ItemRetryPolicy.max_attempts` (3) attempts in all; then it fails, ``retryable``.
- **deterministic** — trying again cannot help: ``invalid_client``
  (:class:`~tokenbroker.errors.ClientAuthenticationError`), ``invalid_grant``
  (:class:`~tokenbroker.errors.ReauthorizationRequiredError`), other provider 4xx
  (:class:`~tokenbroker.errors.ProviderMisconfiguredError`), bad configuration, a damaged
  store row, and anything unforeseen (a bug is not retried). The item fails at once, not
  ``retryable``.

A job whose items all ended is ``done`` when none failed, ``failed`` when all failed and
``partial`` otherwise (:func:`job_outcome`). Nothing here sleeps: :meth:`ItemRetryPolicy.delay`
answers how long the runner should wait. Failure reasons never carry a foreign exception's
text (it could hold a reply body); tokenbroker's own messages are secret-free by contract.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from tokenbroker.errors import (
    ProviderUnavailableError,
    StoreCorruptError,
    StoreError,
    TokenBrokerError,
)
from tokenbroker.jobs.model import FailedItem, ItemCounts, JobStatus

__all__ = [
    "ErrorClass",
    "ItemRetryPolicy",
    "classify",
    "failure",
    "job_outcome",
    "reason",
    "retryable_items",
]


class ErrorClass(StrEnum):
    """Whether trying an item again may help."""

    TRANSIENT = "transient"
    DETERMINISTIC = "deterministic"


def classify(error: BaseException) -> ErrorClass:
    """The class of a failure (see the module docstring for the table).

    Args:
        error: What an item's attempt raised.

    Returns:
        :attr:`ErrorClass.TRANSIENT` for timeouts, 429/5xx/network failures and a busy
        store; :attr:`ErrorClass.DETERMINISTIC` for everything else.
    """
    if isinstance(error, StoreCorruptError):
        return ErrorClass.DETERMINISTIC
    if isinstance(error, ProviderUnavailableError | StoreError | TimeoutError | ConnectionError):
        return ErrorClass.TRANSIENT
    return ErrorClass.DETERMINISTIC


def reason(error: BaseException) -> str:
    """A secret-free description of a failure for ``failed[].reason``.

    Returns:
        ``code: message`` for tokenbroker's errors (``code`` when the class has one, else
        the class name); only the class name for any other exception.
    """
    if isinstance(error, TokenBrokerError):
        code = getattr(error, "code", None) or type(error).__name__
        message = str(error).splitlines()[0] if str(error) else ""
        return f"{code}: {message}" if message else str(code)
    return type(error).__name__


def failure(item: str, error: BaseException) -> FailedItem:
    """The record of an item that failed for good with ``error``; ``retryable`` when the
    failure was transient."""
    return FailedItem(item, reason(error), classify(error) is ErrorClass.TRANSIENT)


@dataclass(frozen=True, slots=True)
class ItemRetryPolicy:
    """How often and how patiently one item is tried.

    Attributes:
        max_attempts: Attempts in all, the first included (at most 3 by default).
        backoff: Base of the exponential backoff in seconds: attempt *n*'s wait is drawn
            uniformly from ``[0, min(max_backoff, backoff * 2^(n-1))]`` (full jitter).
        max_backoff: The cap on any wait, in seconds.

    Raises:
        ValueError: For fewer than one attempt or a negative backoff.
    """

    max_attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff must not be negative")

    def delay(
        self, attempt: int, error: BaseException, rng: random.Random | None = None
    ) -> float | None:
        """How long to wait before trying again after attempt ``attempt`` failed.

        Args:
            attempt: The number of the attempt that failed (1 for the first).
            error: What it raised.
            rng: Source of jitter (tests inject a seeded one).

        Returns:
            Seconds to wait, at least a provider's ``Retry-After`` (capped at
            ``max_backoff``); None when the item must not be tried again: the failure is
            deterministic, or ``max_attempts`` attempts have been made.
        """
        if classify(error) is ErrorClass.DETERMINISTIC or attempt >= self.max_attempts:
            return None
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        wait = (rng or random.Random()).uniform(0, cap)  # noqa: S311 - jitter, not security
        told = getattr(error, "retry_after", None)
        if isinstance(told, int | float) and told > 0:
            wait = max(wait, min(float(told), self.max_backoff))
        return wait


def job_outcome(items: ItemCounts) -> JobStatus:
    """How a job whose items have all ended ends.

    Args:
        items: The job's counts; ``ok + failed`` must equal ``total``.

    Returns:
        ``done`` when no item failed (also for a job without items), ``failed`` when every
        item failed, ``partial`` otherwise.

    Raises:
        ValueError: While some items have not ended.
    """
    if items.ok + items.failed != items.total:
        raise ValueError(f"{items.total - items.ok - items.failed} item(s) have not ended")
    if items.failed == 0:
        return JobStatus.DONE
    if items.ok == 0:
        return JobStatus.FAILED
    return JobStatus.PARTIAL


def retryable_items(failed: Iterable[FailedItem]) -> list[str]:
    """The items a retry job should try again: those whose failure was transient, in order,
    each once."""
    return list(dict.fromkeys(f.item for f in failed if f.retryable))
