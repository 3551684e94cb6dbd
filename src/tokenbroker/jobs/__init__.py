"""Jobs: long broker work that runs in the background and reports live progress.

The pure model: :mod:`~tokenbroker.jobs.model` (the record, its states and legal moves, ids,
canonical params), :mod:`~tokenbroker.jobs.progress` (weighted phases, monotonic progress,
coalescing), :mod:`~tokenbroker.jobs.policy` (error classes, retries, outcomes) and
:mod:`~tokenbroker.jobs.events` (the SSE vocabulary and the resumable event log). The
running parts: :mod:`~tokenbroker.jobs.kinds` (what each kind does),
:mod:`~tokenbroker.jobs.runner`, :mod:`~tokenbroker.jobs.reaper`,
:mod:`~tokenbroker.jobs.schedule`, :mod:`~tokenbroker.jobs.subscriptions` and
:mod:`~tokenbroker.jobs.service` (``JobService(broker)``, the Python API). Jobs live in the
store (:class:`~tokenbroker.store.base.JobStore`). Imports nothing above the engine.
"""
