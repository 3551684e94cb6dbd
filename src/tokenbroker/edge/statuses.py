"""Domain error → HTTP answer: the one table the API, the proxy and BrokerClient share.

DESIGN §3.3: an unknown (or forbidden) provider is 404 ``not_found``; a dead refresh
token 409 ``reauthorization_required``; a provider that rejects the broker's client
500 ``provider_misconfigured`` (retrying cannot help, so not a 5xx clients retry);
a provider down after retries 503 ``provider_unavailable`` with ``Retry-After`` (for a
delegation: the broker's own service token could not be had, or the endpoint's reply was
already expired); a provider's upstream delegation endpoint failing after retries, while
the service token was fine, 502 ``delegation_failed``; a failing store 503
``store_unavailable`` with ``Retry-After``. Anything unmapped is 500 ``internal_error``.
A delegation whose object is not a safe relative path (or whose subject is malformed)
is 400 ``invalid_delegation``; one for a subject the consumer may not name is 403
``forbidden_subject``. Jobs (issue 16): an unknown kind is 400
``unknown_job_kind`` (listing the kinds), bad params 400 ``invalid_job_params`` (naming the
field), an unknown job id — or a job of a provider the consumer may not use — 404
``job_not_found``, a retry with nothing to retry 409 ``job_not_retryable``, too many active
jobs 429 ``too_many_jobs`` with ``Retry-After``. For these rows :attr:`ErrorStatus.detailed`
is set: the answer's message is the error's own (fixed sentences naming a kind or a param,
never a value). The HTTP API (:mod:`tokenbroker.api.app`) and the proxy
(:mod:`tokenbroker.proxy`) answer from :func:`status_of`; :class:`~tokenbroker.BrokerClient`
reads an answer's code back into :attr:`ErrorStatus.error` with :func:`status_for_code`.

Messages are fixed sentences: an answer never carries an exception's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import (
    ClientAuthenticationError,
    DelegationFailedError,
    ForbiddenSubjectError,
    InvalidDelegationError,
    InvalidJobParamsError,
    JobLimitError,
    JobNotRetryableError,
    PoolExhaustedError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    StoreError,
    TokenBrokerError,
    TooManyScopesError,
    UnknownJobError,
    UnknownJobKindError,
    UnknownProviderError,
)

__all__ = [
    "DELEGATION_FAILED",
    "ERROR_STATUS",
    "FORBIDDEN_SUBJECT",
    "INTERNAL_ERROR",
    "INVALID_DELEGATION",
    "INVALID_JOB_PARAMS",
    "INVALID_REQUEST",
    "JOB_NOT_FOUND",
    "JOB_NOT_RETRYABLE",
    "NOT_FOUND",
    "POOL_EXHAUSTED",
    "PROVIDER_MISCONFIGURED",
    "PROVIDER_UNAVAILABLE",
    "RATE_LIMITED",
    "REAUTHORIZATION_REQUIRED",
    "REQUEST_TIMEOUT",
    "STORE_UNAVAILABLE",
    "TOO_MANY_JOBS",
    "TOO_MANY_SCOPES",
    "UNAUTHORIZED",
    "UNKNOWN_JOB_KIND",
    "ErrorStatus",
    "retry_after",
    "status_for_code",
    "status_of",
]

#: Seconds a client is told to wait when the failure did not say.
DEFAULT_RETRY_AFTER = 5


@dataclass(frozen=True, slots=True)
class ErrorStatus:
    """How one kind of failure is answered over HTTP.

    Attributes:
        status: The HTTP status.
        code: The stable ``error.code`` of the body.
        message: The ``error.message`` of the body; never holds a secret.
        error: What :class:`~tokenbroker.BrokerClient` raises when it reads ``code``.
        retry_after: The answer has a ``Retry-After`` header.
        detailed: The answer's message is the error's own text (only for errors whose
            messages are fixed sentences naming no value: the job request errors).
    """

    status: int
    code: str
    message: str
    error: type[TokenBrokerError]
    retry_after: bool = False
    detailed: bool = False


#: Also the answer to a provider or scope the key may not use, so its words must be true of both.
NOT_FOUND = ErrorStatus(
    404, "not_found", "no such provider or scope for this key", UnknownProviderError
)
INVALID_DELEGATION = ErrorStatus(
    400,
    "invalid_delegation",
    "invalid delegation: the object must be a safe relative path, the subject visible ASCII",
    InvalidDelegationError,
)
FORBIDDEN_SUBJECT = ErrorStatus(
    403,
    "forbidden_subject",
    "this consumer may delegate only for its own subject",
    ForbiddenSubjectError,
)
TOO_MANY_SCOPES = ErrorStatus(
    400,
    "too_many_scopes",
    "the provider serves no more distinct scope sets",
    TooManyScopesError,
)
REAUTHORIZATION_REQUIRED = ErrorStatus(
    409,
    "reauthorization_required",
    "the provider's refresh token is dead; authorise again",
    ReauthorizationRequiredError,
)
PROVIDER_MISCONFIGURED = ErrorStatus(
    500,
    "provider_misconfigured",
    "the provider rejected the broker's client configuration",
    ProviderMisconfiguredError,
)
POOL_EXHAUSTED = ErrorStatus(
    503,
    "pool_exhausted",
    "no pool token became free in time; retry later",
    PoolExhaustedError,
    retry_after=True,
)
DELEGATION_FAILED = ErrorStatus(
    502,
    "delegation_failed",
    "the provider's delegation endpoint failed; retry later",
    DelegationFailedError,
    retry_after=True,
)
PROVIDER_UNAVAILABLE = ErrorStatus(
    503,
    "provider_unavailable",
    "the provider is unavailable; retry later",
    ProviderUnavailableError,
    retry_after=True,
)
STORE_UNAVAILABLE = ErrorStatus(
    503,
    "store_unavailable",
    "the broker's store is unavailable; retry later",
    StoreError,
    retry_after=True,
)
UNKNOWN_JOB_KIND = ErrorStatus(
    400, "unknown_job_kind", "unknown job kind", UnknownJobKindError, detailed=True
)
INVALID_JOB_PARAMS = ErrorStatus(
    400, "invalid_job_params", "invalid job params", InvalidJobParamsError, detailed=True
)
JOB_NOT_FOUND = ErrorStatus(404, "job_not_found", "no such job", UnknownJobError)
JOB_NOT_RETRYABLE = ErrorStatus(
    409, "job_not_retryable", "the job has no failed retryable items", JobNotRetryableError
)
TOO_MANY_JOBS = ErrorStatus(
    429,
    "too_many_jobs",
    "this consumer has too many active jobs; retry later",
    JobLimitError,
    retry_after=True,
)

#: Domain error → its answer. The first row whose class matches wins (subclasses first).
ERROR_STATUS: tuple[tuple[type[TokenBrokerError], ErrorStatus], ...] = (
    (TooManyScopesError, TOO_MANY_SCOPES),
    (InvalidDelegationError, INVALID_DELEGATION),
    (ForbiddenSubjectError, FORBIDDEN_SUBJECT),
    (UnknownProviderError, NOT_FOUND),
    (ReauthorizationRequiredError, REAUTHORIZATION_REQUIRED),
    (ProviderMisconfiguredError, PROVIDER_MISCONFIGURED),
    (PoolExhaustedError, POOL_EXHAUSTED),
    (DelegationFailedError, DELEGATION_FAILED),
    (ProviderUnavailableError, PROVIDER_UNAVAILABLE),
    (StoreError, STORE_UNAVAILABLE),
    (UnknownJobKindError, UNKNOWN_JOB_KIND),
    (InvalidJobParamsError, INVALID_JOB_PARAMS),
    (UnknownJobError, JOB_NOT_FOUND),
    (JobNotRetryableError, JOB_NOT_RETRYABLE),
    (JobLimitError, TOO_MANY_JOBS),
)

# Answers of the HTTP layers themselves (no domain error behind them), in the same terms.
UNAUTHORIZED = ErrorStatus(
    401, "unauthorized", "a valid API key is required", ClientAuthenticationError
)
RATE_LIMITED = ErrorStatus(
    429,
    "rate_limited",
    "too many requests; retry later",
    ProviderUnavailableError,
    retry_after=True,
)
INVALID_REQUEST = ErrorStatus(400, "invalid_request", "invalid request", ProviderMisconfiguredError)
#: A request that did not arrive in time (its body fell silent, or it took too long in all);
#: the connection is closed after it. Sending the request again may succeed.
REQUEST_TIMEOUT = ErrorStatus(
    408, "request_timeout", "the request did not arrive in time", ProviderUnavailableError
)
#: Anything unmapped: a bug or an unexpected fault; clients may retry.
INTERNAL_ERROR = ErrorStatus(500, "internal_error", "internal error", ProviderUnavailableError)

_BY_CODE = {
    row.code: row
    for row in (
        *(row for _, row in ERROR_STATUS),
        UNAUTHORIZED,
        RATE_LIMITED,
        INVALID_REQUEST,
        REQUEST_TIMEOUT,
        INTERNAL_ERROR,
    )
}


def status_of(exc: BaseException) -> ErrorStatus:
    """The answer for ``exc``: its row in :data:`ERROR_STATUS`, else :data:`INTERNAL_ERROR`."""
    for kind, row in ERROR_STATUS:
        if isinstance(exc, kind):
            return row
    return INTERNAL_ERROR


def status_for_code(code: str | None) -> ErrorStatus | None:
    """The row an answer's ``error.code`` names, if it is one of ours."""
    return _BY_CODE.get(code) if code is not None else None


def retry_after(exc: BaseException) -> int:
    """Whole seconds for ``Retry-After``: what the failure said (rounded up), else 5; at least 1."""
    delay = getattr(exc, "retry_after", None)
    if not isinstance(delay, int | float) or not math.isfinite(delay):
        delay = None
    return max(1, math.ceil(delay or DEFAULT_RETRY_AFTER))
