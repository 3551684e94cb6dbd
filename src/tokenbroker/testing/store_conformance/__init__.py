"""One conformance suite for every store backend (:mod:`tokenbroker.store.base`).

Model: the ``limits`` library's ``all_storage`` tests. Subclass :class:`StoreConformance`
in a test module and provide a ``store_factory`` fixture returning a :class:`StoreFactory`
(parametrise it to run the suite against several backends)::

    @pytest.fixture(params=["sqlite-file", "memory"])
    def store_factory(request, tmp_path) -> StoreFactory: ...

    class TestStoreConformance(StoreConformance):
        \"\"\"Every guarantee of the store protocol, against every backend.\"\"\"

The suite proves the fenced protocol (checklist D7: a stale fence changes nothing), lease
expiry and takeover on the store's clock, write-ahead attempts, sealed raw replies,
consumers, signing keys, key rotation, jobs (fenced job leases, cancel, events, pruning,
schedule claims), schema versions, and encryption at rest (D6: a
ciphertext moved to another row, column or version fails to decrypt; no plaintext canary
in what the backend persists). It touches a backend's stored bytes only through the
documented :meth:`~tokenbroker.store.base.Store.raw` test hook. Needs pytest.
"""

from __future__ import annotations

from .attempts import AttemptConformance
from .connections import ConnectionConformance
from .consumers import ConsumerConformance
from .encryption import EncryptionConformance
from .fixtures import StoreFactory, keyring, refresh, stored, wait_until_expired
from .jobs import JobConformance
from .leases import LeaseConformance

__all__ = ["StoreConformance", "StoreFactory", "keyring", "refresh", "stored", "wait_until_expired"]


class StoreConformance(
    LeaseConformance,
    AttemptConformance,
    ConsumerConformance,
    EncryptionConformance,
    ConnectionConformance,
    JobConformance,
):
    """The store protocol's guarantees; subclass it and provide a ``store_factory`` fixture.

    Its parts, one concern each: :mod:`.leases`, :mod:`.attempts`, :mod:`.consumers`,
    :mod:`.encryption`, :mod:`.connections`, :mod:`.jobs`; the fixtures and helpers in
    :mod:`.fixtures`.
    """
