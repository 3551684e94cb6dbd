"""Every error tokenbroker raises, in one hierarchy.

::

    TokenBrokerError
    ├── ConfigError                     bad configuration; lists every problem with its field path
    │   └── EncryptionKeyError          a key is malformed, or stored secrets need a key we lack
    ├── UnknownProviderError            no such provider (or scope/account not valid for it)
    │   ├── InvalidScopeError           a scope that is not RFC 6749 scope-tokens
    │   └── TooManyScopesError          a new scope set beyond the provider's ``max_scopes``
    ├── InvalidDelegationError          a delegation's object or subject is malformed
    ├── ForbiddenSubjectError           a consumer asked for a subject it may not delegate for
    ├── JobRequestError                 a job request that cannot be served (code says why)
    │   ├── UnknownJobKindError         no such job kind; the message lists the kinds
    │   ├── InvalidJobParamsError       bad job params; ``field`` names the one at fault
    │   ├── UnknownJobError             no job with that id (never a default state)
    │   ├── JobNotRetryableError        a retry of a job with no failed retryable items
    │   └── JobLimitError               too many running jobs for a consumer or instance
    ├── StoreError                      the durable store failed (locked, disk full, read-only)
    │   └── StoreCorruptError           a stored row or ciphertext is damaged or was moved
    ├── CoordinationUnavailableError    Redis did not answer; every caller falls back
    └── ProviderError                   the identity provider could not give us a token
        ├── ProviderMisconfiguredError  a 4xx we cannot fix by retrying            (not retried)
        │   └── ClientAuthenticationError  401/403 or ``invalid_client``           (not retried)
        ├── ReauthorizationRequiredError   ``invalid_grant`` / ``login_required``  (not retried)
        └── ProviderUnavailableError    5xx, 429, network error, timeout, malformed reply (retried)
            ├── InvalidTokenError       a token value with CR/LF/NUL or non-visible characters
            └── DelegationFailedError   the upstream delegation endpoint failed (service token fine)

Messages name the provider, the HTTP status and at most the provider's OAuth
``error`` code (checked against RFC 6749's character set); they never carry a
secret, a token, a request or response body, or an ``error_description``; nor do
their attributes, args or chains. Protocol state never rides on an error: what the
refresh protocol needs from a failed exchange travels in
:class:`tokenbroker.grants.Exchange`, which callers never receive.
Foreign exceptions (httpx, pydantic, yaml) are translated where they occur with
``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ClientAuthenticationError",
    "ConfigError",
    "ConfigProblem",
    "DelegationFailedError",
    "EncryptionKeyError",
    "ForbiddenSubjectError",
    "InvalidDelegationError",
    "InvalidJobParamsError",
    "InvalidScopeError",
    "InvalidTokenError",
    "JobLimitError",
    "JobNotRetryableError",
    "JobRequestError",
    "LeaseExpiredError",
    "PoolExhaustedError",
    "ProviderError",
    "ProviderMisconfiguredError",
    "ProviderUnavailableError",
    "ReauthorizationRequiredError",
    "StoreCorruptError",
    "StoreError",
    "TokenBrokerError",
    "TooManyScopesError",
    "UnknownJobError",
    "UnknownJobKindError",
    "UnknownProviderError",
]


class TokenBrokerError(Exception):
    """Base class of every tokenbroker error."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in a configuration.

    Attributes:
        path: Dotted field path, e.g. ``providers.tdx.client_secret``.
        message: What is wrong, never including a secret's value.
        env_var: The missing environment variable, when that is the problem.
    """

    path: str
    message: str
    env_var: str | None = None

    def __str__(self) -> str:
        return f"{self.path or '(top level)'}: {self.message}"


class ConfigError(TokenBrokerError):
    """The configuration is invalid.

    Args:
        problems: Every problem found, so one run reports them all.
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class EncryptionKeyError(ConfigError):
    """An encryption key is malformed or missing; start-up fails closed.

    Args:
        message: What is wrong, naming key positions or ids, never key material.
    """

    def __init__(self, message: str) -> None:
        super().__init__([ConfigProblem("encryption_keys", message)])


class InvalidDelegationError(TokenBrokerError):
    """A delegation's object is not a safe relative path, or its subject is malformed."""


class ForbiddenSubjectError(TokenBrokerError):
    """A consumer asked for a delegated token on behalf of a subject other than its own
    without a ``delegate-as:PROVIDER`` rule."""


class StoreError(TokenBrokerError):
    """The durable store could not do what was asked; nothing was half-written.

    Still-valid tokens keep being served from memory meanwhile.
    """

    code = "store_unavailable"


class StoreCorruptError(StoreError):
    """A stored row or ciphertext is damaged, or was moved to another row or column."""

    code = "store_corrupt"


class CoordinationUnavailableError(TokenBrokerError):
    """Redis did not answer in time, or its circuit breaker is open.

    Never reaches a consumer: every caller falls back (to polling the store, to its own
    rate-limit counts), because Redis only makes things faster and never decides.
    """


class UnknownProviderError(TokenBrokerError):
    """The provider, scope or account asked for is not configured."""


class InvalidScopeError(UnknownProviderError):
    """A scope is not RFC 6749 §3.3 scope-tokens separated by spaces (or is too long)."""


class TooManyScopesError(UnknownProviderError):
    """A new scope set would exceed the provider's ``max_scopes``; nothing was sent or stored."""


class ProviderError(TokenBrokerError):
    """The identity provider did not give us a usable token.

    Args:
        message: Human-readable description without secrets.
        provider: The provider's configured name.
        status_code: The HTTP status of the provider's reply, if any.
        error_code: The provider's OAuth ``error`` code, if it was well-formed.
    """

    #: Stable machine-readable code, used by the HTTP layer's error table.
    code = "provider_error"
    #: Whether the retry loop may try again.
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        error_code: str | None = None,
    ) -> None:
        self.provider = provider
        self.status_code = status_code
        self.error_code = error_code
        super().__init__(message)


class ProviderMisconfiguredError(ProviderError):
    """The provider rejected our request in a way retrying cannot fix."""

    code = "provider_misconfigured"


class ClientAuthenticationError(ProviderMisconfiguredError):
    """The provider rejected our client credentials (401/403, ``invalid_client``)."""


class ReauthorizationRequiredError(ProviderError):
    """The refresh token is dead (``invalid_grant``, Tesla's ``login_required``).

    A person has to authorise again; tokenbroker stops calling the provider
    for this credential until it gets a new refresh token.
    """

    code = "reauthorization_required"


class ProviderUnavailableError(ProviderError):
    """The provider could not answer usefully: 5xx, 429, network, timeout, bad reply.

    Args:
        message: Human-readable description without secrets.
        retry_after: Seconds the provider asked us to wait, if it said.
        sent: False only when the request certainly never reached the provider
            (connection refused), so retrying a single-use refresh token is safe.
        **kwargs: As for :class:`ProviderError`.
    """

    code = "provider_unavailable"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        sent: bool = True,
        provider: str = "",
        status_code: int | None = None,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message, provider=provider, status_code=status_code, error_code=error_code)
        self.retry_after = retry_after
        self.sent = sent


class PoolExhaustedError(ProviderUnavailableError):
    """No pool credential became free within the wait timeout (or the pool closed).

    A :class:`ProviderUnavailableError`, so HTTP layers answer 503 with
    ``Retry-After: retry_after``.
    """

    code = "pool_exhausted"


class LeaseExpiredError(TokenBrokerError):
    """A pool lease was reaped (idle or too old) and its credential went back to the pool.

    The caller should close its client connection or acquire a new lease.
    """


class InvalidTokenError(ProviderUnavailableError):
    """A token in the provider's reply is not a safe header value; it is never used."""


class JobRequestError(TokenBrokerError):
    """A job request that cannot be served; ``code`` is the API's word for why."""

    code = "invalid_job_request"


class UnknownJobKindError(JobRequestError):
    """No job kind of that name; the message lists the kinds there are."""

    code = "unknown_job_kind"


class InvalidJobParamsError(JobRequestError):
    """A job's params are malformed; ``field`` names the param at fault (never its value)."""

    code = "invalid_job_params"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"params.{field}: {message}" if field else f"params: {message}")


class UnknownJobError(JobRequestError):
    """No job with that id (unknown ids are an error, never a default state)."""

    code = "job_not_found"


class JobNotRetryableError(JobRequestError):
    """A retry was asked of a job that has no failed retryable items (or has not ended)."""

    code = "job_not_retryable"


class JobLimitError(JobRequestError):
    """Too many active jobs for the consumer, or a full queue (``jobs.max_queued``);
    ``retry_after`` says when to try again."""

    code = "too_many_jobs"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class DelegationFailedError(ProviderUnavailableError):
    """The provider's upstream delegation endpoint failed after retries (an error status, no
    usable token, unreachable), while the broker's own service token was fine.

    Raised once the delegation exchange has ended (it is never retried itself); it keeps the
    endpoint's HTTP status and ``Retry-After``. A failure to get the service token stays a
    plain :class:`ProviderUnavailableError` (or its own class), so the two are told apart.
    """

    code = "delegation_failed"
