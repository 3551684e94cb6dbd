"""Error classes, item retries with capped full-jitter backoff, and job outcomes."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tokenbroker.errors import (
    ClientAuthenticationError,
    ConfigError,
    ConfigProblem,
    EncryptionKeyError,
    PoolExhaustedError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    StoreCorruptError,
    StoreError,
    UnknownProviderError,
)
from tokenbroker.jobs.model import FailedItem, ItemCounts, JobStatus
from tokenbroker.jobs.policy import (
    ErrorClass,
    ItemRetryPolicy,
    classify,
    failure,
    job_outcome,
    reason,
    retryable_items,
)

TRANSIENT: list[BaseException] = [
    ProviderUnavailableError("tdx: HTTP 503", provider="tdx", status_code=503),
    ProviderUnavailableError("tdx: HTTP 429", provider="tdx", status_code=429, retry_after=2),
    ProviderUnavailableError("tdx: timed out", provider="tdx"),
    PoolExhaustedError("pool busy"),
    TimeoutError(),
    ConnectionResetError(),
    StoreError("database is locked"),
]
DETERMINISTIC: list[BaseException] = [
    ClientAuthenticationError("tdx: invalid_client", error_code="invalid_client"),
    ReauthorizationRequiredError("tdx: invalid_grant", error_code="invalid_grant"),
    ProviderMisconfiguredError("tdx: HTTP 400 invalid_scope"),
    ConfigError([ConfigProblem("providers.tdx.token_url", "missing")]),
    EncryptionKeyError("no key"),
    UnknownProviderError("nope"),
    StoreCorruptError("row 3 damaged"),
    KeyError("bug"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=repr)
def test_timeouts_429_5xx_and_a_busy_store_are_transient(error: BaseException) -> None:
    """Failures that may pass if tried again are transient and their items retryable."""
    assert classify(error) is ErrorClass.TRANSIENT
    assert failure("alice", error).retryable is True


@pytest.mark.parametrize("error", DETERMINISTIC, ids=repr)
def test_invalid_client_invalid_grant_config_and_bugs_are_deterministic(
    error: BaseException,
) -> None:
    """Failures retrying cannot fix are deterministic: never retried, never retryable."""
    assert classify(error) is ErrorClass.DETERMINISTIC
    assert ItemRetryPolicy().delay(1, error) is None
    assert failure("alice", error).retryable is False


def _run_item(
    policy: ItemRetryPolicy, attempt_once: Callable[[int], None], rng: random.Random
) -> tuple[int, list[float], BaseException | None]:
    """Drive one item as the runner will: attempt, ask the policy, 'sleep', again."""
    attempts, waits = 0, []
    while True:
        attempts += 1
        try:
            attempt_once(attempts)
        except Exception as exc:
            wait = policy.delay(attempts, exc, rng)
            if wait is None:
                return attempts, waits, exc
            waits.append(wait)
        else:
            return attempts, waits, None


def test_a_transient_item_gets_at_most_3_attempts_with_bounded_backoff() -> None:
    """Always failing transiently: exactly 3 attempts; each wait within [0, base * 2^(n-1)]."""
    policy = ItemRetryPolicy(backoff=0.5, max_backoff=30.0)
    rng = random.Random(7)
    for _ in range(200):

        def always(_: int) -> None:
            raise ProviderUnavailableError("tdx: HTTP 502", status_code=502)

        attempts, waits, error = _run_item(policy, always, rng)
        assert attempts == 3 and isinstance(error, ProviderUnavailableError)
        assert len(waits) == 2
        assert 0.0 <= waits[0] <= 0.5 and 0.0 <= waits[1] <= 1.0


def test_a_deterministic_item_is_tried_once_and_a_recovering_one_stops_on_success() -> None:
    """invalid_grant: one attempt; a 503 then success: two attempts, no failure."""
    rng = random.Random(1)

    def dead(_: int) -> None:
        raise ReauthorizationRequiredError("tdx: invalid_grant")

    def flaky(n: int) -> None:
        if n == 1:
            raise ProviderUnavailableError("tdx: HTTP 503")

    assert _run_item(ItemRetryPolicy(), dead, rng)[0] == 1
    attempts, waits, error = _run_item(ItemRetryPolicy(), flaky, rng)
    assert (attempts, len(waits), error) == (2, 1, None)


def test_backoff_is_capped_and_honours_retry_after() -> None:
    """Waits never exceed max_backoff; a provider's Retry-After raises the wait up to that cap."""
    rng = random.Random(3)
    policy = ItemRetryPolicy(max_attempts=10, backoff=1.0, max_backoff=4.0)
    plain = ProviderUnavailableError("tdx: HTTP 500")
    assert all(0.0 <= (policy.delay(9, plain, rng) or 0.0) <= 4.0 for _ in range(200))
    told = ProviderUnavailableError("tdx: HTTP 429", retry_after=3.0)
    assert all((policy.delay(1, told, rng) or 0.0) >= 3.0 for _ in range(50))
    too_long = ProviderUnavailableError("tdx: HTTP 429", retry_after=3600.0)
    assert policy.delay(1, too_long, rng) == 4.0
    assert policy.delay(10, plain, rng) is None
    with pytest.raises(ValueError):
        ItemRetryPolicy(max_attempts=0)


def test_the_outcome_follows_the_items() -> None:
    """All ok (or no items) → done; some failed → partial; all failed → failed; unfinished refused."""
    assert job_outcome(ItemCounts(total=3, ok=3)) is JobStatus.DONE
    assert job_outcome(ItemCounts()) is JobStatus.DONE
    assert job_outcome(ItemCounts(total=3, ok=2, failed=1)) is JobStatus.PARTIAL
    assert job_outcome(ItemCounts(total=3, failed=3)) is JobStatus.FAILED
    with pytest.raises(ValueError, match="1 item"):
        job_outcome(ItemCounts(total=3, ok=1, failed=1))


def test_only_retryable_items_are_tried_again() -> None:
    """A retry job gets the transient failures, in order, once each."""
    failed = [
        failure("a", ProviderUnavailableError("tdx: HTTP 503")),
        failure("b", ClientAuthenticationError("tdx: invalid_client")),
        failure("c", TimeoutError()),
        FailedItem("a", "again", True),
    ]
    assert retryable_items(failed) == ["a", "c"]


def test_reasons_never_carry_a_foreign_exception_text() -> None:
    """Our errors give code and first line; foreign ones only their class name."""
    assert (
        reason(ProviderUnavailableError("tdx: HTTP 503")) == "provider_unavailable: tdx: HTTP 503"
    )
    assert reason(ConfigError([ConfigProblem("a.b", "bad")])).startswith("ConfigError: invalid")
    assert reason(ValueError('body: {"access_token": "s3cret"}')) == "ValueError"
