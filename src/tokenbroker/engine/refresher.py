"""The fenced refresh protocol: one token request per expiry across threads *and* processes.

:class:`Refresher` wraps every token fetch the cache asks for (refresh protocol,
``reference/refresh-protocol.md``):

0. a still-usable token in the store (another process refreshed) is used as is;
1. otherwise take the lease on the credential row (database clock, fence bump), or wait
   for the holder — taking over at once from a holder on this host whose process is gone;
2. re-check under the lease;
3. for refresh-token credentials, write an intent record before sending;
4. send only if the lease outlives the exchange's whole deadline;
5. send (retry policy from :mod:`tokenbroker.grants.flow`);
6. store the raw reply and apply the tokens in one fenced transaction;
7. recover in-doubt attempts of earlier holders by the provider's rotation policy:
   inside ``reuse_grace_seconds`` retry with the same token; with no grace retry once,
   then mark the credential ``reauthorization_required`` — never a retry storm.

With a :class:`~tokenbroker.engine.coordination.Coordinator` (cluster mode: Redis), a caller
waiting for another process's lease waits for its "credential changed" notice (published
when any holder releases a lease) instead of polling blindly, and re-reads the store after
the notice *or* after ``wait_seconds``, since notices can be lost; while the coordinator is
degraded it polls with backoff as without one. The lease alone decides who refreshes.

``hook(point)`` is called at ``before_send``, ``after_reply`` and ``after_commit``;
the crash benchmark kills the process there. Every time read goes through the injected
:class:`~tokenbroker.core.clock.Clock` (the broker passes its own) and every pause through
the injected ``sleep``, so tests drive the waits with a
:class:`~tokenbroker.core.clock.ManualClock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..core import tracing
from ..core.clock import Clock, SystemClock
from ..core.secret import Secret
from ..core.token import Token
from ..errors import (
    ProviderError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    StoreError,
)
from ..grants import Exchange, Grant, RetryPolicy, TokenResponse
from ..store import CredentialRow, CredentialStore, Lease, StoredToken
from .coordination import Coordinator, Watch, credential_topic

__all__ = ["RefreshJob", "Refresher", "fingerprint", "owner_id"]

logger = logging.getLogger("tokenbroker.refresher")

_HOST = socket.gethostname()
_COMMIT_TRIES = 3


def owner_id() -> str:
    """A lease owner id: ``host:pid:nonce``, so a dead holder on this host can be detected."""
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def fingerprint(settings: dict[str, object]) -> str:
    """A stable digest of a provider's identity-relevant settings (no secrets go in).

    Args:
        settings: Grant, URLs, client id, scopes, audience, account.

    Returns:
        16 hex characters.
    """
    encoded = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _holder_is_gone(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True, slots=True)
class RefreshJob:
    """One fetch for one credential row.

    Attributes:
        row_id: The credential row.
        provider: Provider name.
        fingerprint: Identity-relevant settings digest; a stored token under another is ignored.
        build: Builds the grant; gets the refresh token to present (None for other grants).
        send: Sends a grant under a retry policy and returns how the exchange ended.
        policy: The retry policy.
        skew: The skew window (stored tokens inside it are not used).
        lease_seconds: Lease time-to-live.
        seed: The configured refresh token (refresh-token credentials only).
        single_use: The provider rotates refresh tokens on every use.
        reuse_grace: Seconds a used refresh token stays valid at the provider.
        stale: The access token the caller wants replaced, if any.
        scope: The canonical scope, in words, kept on the row for ``status`` (not a secret).
        account: The account name of a login credential, likewise.
    """

    row_id: str
    provider: str
    fingerprint: str
    build: Callable[[Secret | None], Grant]
    send: Callable[[Grant, RetryPolicy], Exchange]
    policy: RetryPolicy
    skew: float
    lease_seconds: float
    seed: Secret | None = None
    single_use: bool = False
    reuse_grace: float = 0.0
    stale: str | None = dataclasses.field(default=None, repr=False)  # an access token
    scope: str | None = None
    account: str | None = None

    @property
    def seed_digest(self) -> str | None:
        """SHA-256 of the configured seed, to notice an operator re-authorising."""
        if self.seed is None:
            return None
        return hashlib.sha256(self.seed.reveal().encode()).hexdigest()


class _Retry(Exception):
    """The lease was lost between steps; start over."""


@dataclass(frozen=True, slots=True)
class _Pending:
    """A provider reply whose commit failed: the only copy of a rotated refresh token."""

    rt_version: int
    attempt: int
    response: TokenResponse
    refresh_token: Secret | None


class Refresher:
    """Runs :class:`RefreshJob` objects against a :class:`~tokenbroker.store.CredentialStore`.

    Args:
        store: The durable store.
        hook: Called with a crash-point name (tests and the crash benchmark).
        clock: Time source for the give-up deadline, the lease budget and whether a stored
            token is still usable (default: the system's).
        sleep: Pauses between looks at a lease someone else holds and between commit tries
            (tests pass :meth:`~tokenbroker.core.clock.ManualClock.sleep`).
        coordinator: Carries "credential changed" notices between processes; None: poll.
        wait_seconds: With a coordinator, the longest wait for a notice before looking at the
            store again (the fallback when a notice is lost).
    """

    def __init__(
        self,
        store: CredentialStore,
        *,
        hook: Callable[[str], None] | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        coordinator: Coordinator | None = None,
        wait_seconds: float = 0.5,
    ) -> None:
        self.store = store
        self.coordinator = coordinator
        self.wait_seconds = wait_seconds
        self.owner = owner_id()
        self.clock: Clock = clock or SystemClock()
        self._sleep = sleep
        self._hook = hook or (lambda point: None)
        self._rng = random.Random()  # noqa: S311 - jitter, not security
        # Replies received but not committed (store down), by row: retried under the next lease.
        self._pending: dict[str, _Pending] = {}

    def __repr__(self) -> str:
        return f"Refresher(store={self.store!r})"

    def run(self, job: RefreshJob) -> TokenResponse:
        """Get a token for ``job``: from the store if another process refreshed, else fetch it.

        Returns:
            The token response (``issued_at`` set when it came from the store).

        Raises:
            ProviderError: The classified failure of the fetch.
            ReauthorizationRequiredError: The credential is marked dead.
            StoreError: The store failed; nothing was half-written.
        """
        coordinator = self.coordinator
        if coordinator is None:
            return self._run(job, None)
        topic = credential_topic(job.row_id)
        # Watch before the first look at the lease: a release published in between still wakes.
        with coordinator.watch(topic) as watch:
            return self._run(job, watch)

    def _run(self, job: RefreshJob, watch: Watch | None) -> TokenResponse:
        give_up = self.clock.monotonic() + job.policy.deadline + job.lease_seconds
        pause = 0.005
        while True:
            row = self.store.load(job.row_id)
            # A dead credential is reported before its stored access token is served: with
            # family revocation (RFC 9700 §4.14.2) that token was revoked along with it.
            if _dead(row, job):
                raise _reauth(job, "the refresh token was rejected; authorise again")
            usable = self._usable(row.token if row else None, job)
            if usable is not None:
                return usable
            acquire = functools.partial(
                self.store.acquire,
                job.row_id,
                job.provider,
                self.owner,
                job.lease_seconds,
                scope=job.scope,
                account=job.account,
            )
            lease = acquire()
            if lease is None and row is not None and _holder_is_gone(row.lease_owner):
                logger.warning("taking over the lease of a dead process provider=%s", job.provider)
                lease = acquire(steal_from=row.lease_owner)
            if lease is None:
                if self.clock.monotonic() > give_up:
                    raise ProviderUnavailableError(
                        f"{job.provider}: another process's refresh did not finish in time",
                        provider=job.provider,
                        sent=False,
                    )
                self._wait(watch, pause)
                pause = min(pause * 2, 0.1)
                continue
            try:
                with tracing.span(
                    "tokenbroker.lease", {"provider": job.provider, "fence": lease.fence}
                ):
                    return self._under_lease(job, lease, self.clock.monotonic())
            except _Retry:
                continue
            finally:
                with contextlib.suppress(StoreError):
                    self.store.release(lease)
                if self.coordinator is not None:
                    # Whatever happened under the lease, waiters elsewhere look again now.
                    self.coordinator.publish(credential_topic(job.row_id))

    def _wait(self, watch: Watch | None, pause: float) -> None:
        """Wait for another process's lease: for its notice when the coordinator works (then,
        or after ``wait_seconds``, the caller re-reads the store), else a jittered pause."""
        coordinator = self.coordinator
        if watch is not None and coordinator is not None and coordinator.degraded() is None:
            watch.wait(self.wait_seconds)
            return
        self._sleep(pause * self._rng.uniform(0.5, 1.5))

    # -- under the lease -----------------------------------------------------------------------

    def _under_lease(self, job: RefreshJob, lease: Lease, acquired: float) -> TokenResponse:
        row = self.store.load(job.row_id)
        pending = self._pending.pop(job.row_id, None)
        if pending is not None and pending.rt_version == lease.rt_version:
            # Roll forward (step 7, "received but not committed"): the refresh token presented
            # is spent at the provider, so the reply in memory must be stored, not re-fetched.
            if self._commit(job, lease, pending.attempt, pending.response, pending.refresh_token):
                response = pending.response
                obtained = response.token.expires_at - response.lifetime
                return dataclasses.replace(response, issued_at=obtained)
            raise _Retry
        if _dead(row, job):
            raise _reauth(job, "the refresh token was rejected; authorise again")
        usable = self._usable(row.token if row else None, job)
        if usable is not None:
            return usable
        if job.seed is None:
            return self._send_once(job, lease, acquired)
        assert row is not None
        refresh_token = row.refresh_token
        if refresh_token is None or row.seed_digest != job.seed_digest:
            reseeded = self.store.reseed(lease, job.seed, job.seed_digest or "")
            if reseeded is None:
                raise _Retry
            lease, refresh_token = reseeded, job.seed
        elif row.state == "reauthorization_required":
            raise _reauth(job, "the refresh token was rejected; authorise again")
        policy, recovery = self._recovery(job, lease)
        attempt = self.store.begin_attempt(lease, recovery=recovery)
        if attempt is None:
            raise _Retry
        try:
            self._check_time(job, acquired)
        except ProviderError as exc:
            self.store.finish_attempt(
                lease, attempt, status="failed", state="active", error=_summary(exc)
            )
            raise
        self._hook("before_send")
        exchange = job.send(job.build(refresh_token), policy)
        if exchange.error is not None:
            self._record_failure(job, lease, attempt, exchange, recovery)
        response = exchange.result()
        self._hook("after_reply")
        applied = self._commit(
            job, lease, attempt, response, response.refresh_token or refresh_token
        )
        self._hook("after_commit")
        if not applied:
            logger.warning("refresh reply orphaned (fenced out) provider=%s", job.provider)
            raise _Retry
        return response

    def _send_once(self, job: RefreshJob, lease: Lease, acquired: float) -> TokenResponse:
        """A grant without a refresh token: send, and store the reply or the failure."""
        self._check_time(job, acquired)
        self._hook("before_send")
        try:
            response = job.send(job.build(None), job.policy).result()
        except ProviderError as exc:
            # Kept for `tokenbroker status`; the next fetch still tries (no seed to protect).
            dead = isinstance(exc, ReauthorizationRequiredError)
            with contextlib.suppress(StoreError):
                self.store.set_state(
                    lease, "reauthorization_required" if dead else "active", _summary(exc)
                )
            raise
        self._hook("after_reply")
        self._commit(job, lease, None, response, None)
        self._hook("after_commit")
        return response

    def _recovery(self, job: RefreshJob, lease: Lease) -> tuple[RetryPolicy, bool]:
        """Decide what earlier in-doubt attempts allow (step 7)."""
        open_attempts = self.store.open_attempts(job.row_id)
        if not open_attempts or not job.single_use:
            if open_attempts:
                _fenced(
                    self.store.close_attempts(lease, [a.id for a in open_attempts], "superseded")
                )
            return job.policy, False
        ids = [a.id for a in open_attempts]
        if job.reuse_grace > 0:
            if self.store.now() - open_attempts[0].started_at >= job.reuse_grace:
                _fenced(self.store.close_attempts(lease, ids, "superseded"))
                _fenced(
                    self.store.set_state(lease, "reauthorization_required", "InDoubtBeyondGrace")
                )
                raise _reauth(job, "an earlier refresh is in doubt beyond the reuse grace")
            _fenced(self.store.close_attempts(lease, ids, "superseded"))
            return job.policy, False
        if any(a.recovery for a in open_attempts):
            _fenced(self.store.close_attempts(lease, ids, "superseded"))
            _fenced(self.store.set_state(lease, "reauthorization_required", "InDoubt"))
            raise _reauth(job, "an earlier refresh and its recovery are in doubt")
        _fenced(self.store.close_attempts(lease, ids, "superseded"))
        logger.warning("recovering an in-doubt refresh once provider=%s", job.provider)
        return dataclasses.replace(job.policy, max_resends=0), True

    def _record_failure(
        self,
        job: RefreshJob,
        lease: Lease,
        attempt: int,
        exchange: Exchange,
        recovery: bool,
    ) -> None:
        """Close a failed attempt; the exchange's protocol state decides how (step 6)."""
        exc = exchange.error
        assert exc is not None
        error = _summary(exc)
        doubtful = exchange.doubtful_sends
        if isinstance(exc, ReauthorizationRequiredError):
            status, state = "failed", "reauthorization_required"
        elif isinstance(exc, ProviderUnavailableError) and doubtful and job.single_use:
            strict = job.reuse_grace <= 0
            spent = recovery or doubtful >= 2
            status = "in_doubt"
            state = "reauthorization_required" if strict and spent else "in_doubt"
        else:
            status, state = "failed", "active"
        with contextlib.suppress(StoreError):
            self.store.finish_attempt(
                lease, attempt, status=status, state=state, error=error, raw=exchange.unusable_reply
            )
        if state == "reauthorization_required" and not isinstance(
            exc, ReauthorizationRequiredError
        ):
            raise _reauth(
                job, "a single-use refresh token is in doubt after its one retry"
            ) from exc

    def _commit(
        self,
        job: RefreshJob,
        lease: Lease,
        attempt: int | None,
        response: TokenResponse,
        refresh_token: Secret | None,
    ) -> bool:
        stored = StoredToken(
            token=response.token,
            lifetime=response.lifetime,
            obtained_at=response.token.expires_at - response.lifetime,
            fingerprint=job.fingerprint,
        )
        for number in range(1, _COMMIT_TRIES + 1):
            try:
                with tracing.span(
                    "tokenbroker.store.commit", {"fence": lease.fence, "try": number}
                ):
                    return self.store.commit(
                        lease,
                        attempt,
                        stored,
                        refresh_token=refresh_token,
                        seed_digest=job.seed_digest,
                        raw=response.raw,
                    )
            except StoreError:
                if number == _COMMIT_TRIES:
                    logger.error("could not commit a refresh provider=%s", job.provider)
                    if attempt is not None:
                        self._pending[job.row_id] = _Pending(
                            lease.rt_version, attempt, response, refresh_token
                        )
                    raise
                self._sleep(0.05 * number)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_time(self, job: RefreshJob, acquired: float) -> None:
        """Step 4: send only if the lease outlives the whole exchange."""
        left = job.lease_seconds - (self.clock.monotonic() - acquired)
        if left <= job.policy.deadline + 1.0:
            raise ProviderUnavailableError(
                f"{job.provider}: lease too short to refresh safely",
                provider=job.provider,
                sent=False,
            )

    def _usable(self, stored: StoredToken | None, job: RefreshJob) -> TokenResponse | None:
        if stored is None or stored.fingerprint != job.fingerprint:
            return None
        token: Token = stored.token
        if job.stale is not None and token.access_token == job.stale:
            return None
        skew = min(job.skew, stored.lifetime / 2)
        if self.clock.time() >= token.expires_at - skew:
            return None
        return TokenResponse(token=token, lifetime=stored.lifetime, issued_at=stored.obtained_at)


def _summary(exc: ProviderError) -> str:
    """The error class, the provider's HTTP status and its (RFC 6749-checked) ``error`` code:
    what `tokenbroker status` shows; never a message body or a secret."""
    details = [f"HTTP {exc.status_code}"] if exc.status_code is not None else []
    details += [exc.error_code] if exc.error_code else []
    return f"{type(exc).__name__} ({', '.join(details)})" if details else type(exc).__name__


def _fenced(still_ours: bool) -> None:
    """A fenced write updated nothing: another holder took the lease, so start over."""
    if not still_ours:
        raise _Retry


def _dead(row: CredentialRow | None, job: RefreshJob) -> bool:
    """The credential is marked ``reauthorization_required`` for the configured seed."""
    return (
        row is not None
        and job.seed is not None
        and row.state == "reauthorization_required"
        and row.seed_digest == job.seed_digest
    )


def _reauth(job: RefreshJob, why: str) -> ReauthorizationRequiredError:
    return ReauthorizationRequiredError(f"{job.provider}: {why}", provider=job.provider)
