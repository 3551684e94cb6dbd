"""The grammar of ``allow`` rules and delegation subjects (config, store and CLI share it).

A rule is ``provider`` (any scope), ``provider:scope1 scope2`` (those scopes only),
``delegate:provider`` (delegated tokens for the consumer's own subject) or
``delegate-as:provider`` (for any subject it names), the word ``jobs`` (the jobs API, for
the jobs of providers another rule allows), or the word ``admin`` (the status page at ``/ui``
and the ``/v1/events`` stream, over every provider). A stored consumer keeps its subject as the
``subject=NAME`` entry of its allow list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidDelegationError
from .names import PROVIDER_NAME_PATTERN

__all__ = [
    "ADMIN",
    "DELEGATE",
    "DELEGATE_AS",
    "JOBS",
    "Action",
    "Rule",
    "check_subject",
    "parse_allow",
    "parse_rule",
    "subject_entry",
]

_RULE = re.compile(rf"({PROVIDER_NAME_PATTERN})(?::([\x21\x23-\x5b\x5d-\x7e ]+))?\Z")
_PROVIDER = re.compile(rf"{PROVIDER_NAME_PATTERN}\Z")
#: A subject: visible ASCII, no spaces (it goes into JWT ``sub``, upstream templates and audit
#: lines, so no control character or separator may ride along).
_SUBJECT = re.compile(r"[\x21-\x7e]{1,256}\Z")
_SUBJECT_ENTRY = "subject="

#: ``delegate:PROVIDER``: delegated tokens for the consumer's own subject.
DELEGATE = "delegate"
#: ``delegate-as:PROVIDER``: delegated tokens for any subject the consumer names.
DELEGATE_AS = "delegate-as"
#: ``jobs``: the jobs API (start, see, follow, cancel and retry jobs of the providers the
#: consumer's token rules name).
JOBS = "jobs"
#: ``admin``: the status page (``/ui``) and the broker's event stream (``/v1/events``): every
#: provider's state, the pools and every job, and the page's Refresh / Re-authorise / cancel /
#: retry buttons, for every provider.
ADMIN = "admin"
Action = Literal["token", "delegate", "delegate-as", "jobs", "admin"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``allow`` entry.

    Attributes:
        provider: The provider name (``""`` for the ``jobs`` rule, which names none).
        scopes: Allowed scopes, or None for any scope (always None for delegation rules).
        action: ``token`` (token reads), ``delegate`` or ``delegate-as`` (delegated tokens),
            ``jobs`` (the jobs API).
    """

    provider: str
    scopes: frozenset[str] | None
    action: Action = "token"

    def __str__(self) -> str:
        if self.action == "jobs":
            return JOBS
        if self.action == "admin":
            return ADMIN
        if self.action != "token":
            return f"{self.action}:{self.provider}"
        return (
            self.provider
            if self.scopes is None
            else f"{self.provider}:{' '.join(sorted(self.scopes))}"
        )


def parse_rule(text: str) -> Rule:
    """Parse ``provider``, ``provider:scope1 scope2``, ``delegate:provider``,
    ``delegate-as:provider``, ``jobs`` or ``admin``.

    Raises:
        ValueError: For a malformed rule.
    """
    if text.strip() == JOBS:
        return Rule("", None, "jobs")
    if text.strip() == ADMIN:
        return Rule("", None, "admin")
    match = _RULE.match(text.strip())
    if not match:
        raise ValueError(
            "an allow rule is PROVIDER, PROVIDER:SCOPE[ SCOPE...], delegate:PROVIDER,"
            " delegate-as:PROVIDER, jobs or admin"
        )
    provider, scopes = match.group(1), match.group(2)
    if provider in (JOBS, ADMIN):
        raise ValueError(f"{provider} takes nothing after it: allow the word {provider} alone")
    if provider in (DELEGATE, DELEGATE_AS):
        if scopes is None or not _PROVIDER.match(scopes):
            raise ValueError(f"{provider} takes one provider: {provider}:PROVIDER")
        return Rule(scopes, None, "delegate" if provider == DELEGATE else "delegate-as")
    return Rule(provider, None if scopes is None else frozenset(scopes.split()))


def check_subject(subject: str) -> str:
    """Refuse a malformed subject (for a consumer's own, or one named in a request).

    Returns:
        ``subject``, unchanged.

    Raises:
        InvalidDelegationError: Not 1-256 visible ASCII characters (no space, no control
            character).
    """
    if not _SUBJECT.match(subject):
        raise InvalidDelegationError("a subject is 1-256 visible ASCII characters")
    return subject


def subject_entry(subject: str) -> str:
    """The allow-list entry that keeps a stored consumer's subject (``subject=NAME``).

    Raises:
        InvalidDelegationError: As for :func:`check_subject`.
    """
    return _SUBJECT_ENTRY + check_subject(subject)


def parse_allow(texts: Iterable[str]) -> tuple[tuple[Rule, ...], str | None]:
    """A stored allow list: its rules and the subject its ``subject=NAME`` entry names.

    Raises:
        ValueError: A malformed rule, a malformed subject, or two subject entries.
    """
    rules: list[Rule] = []
    subject: str | None = None
    for text in texts:
        if text.startswith(_SUBJECT_ENTRY):
            if subject is not None:
                raise ValueError("more than one subject entry")
            try:
                subject = check_subject(text.removeprefix(_SUBJECT_ENTRY))
            except InvalidDelegationError as exc:
                raise ValueError(str(exc)) from None
        else:
            rules.append(parse_rule(text))
    return tuple(rules), subject
