"""Jobs: long broker work that runs in the background and reports live progress.

This first increment is the pure model, without I/O: :mod:`~tokenbroker.jobs.model` (the
record, its states and legal moves, ids, canonical params), :mod:`~tokenbroker.jobs.progress`
(weighted phases, monotonic progress, coalescing), :mod:`~tokenbroker.jobs.policy` (error
classes, retries, outcomes) and :mod:`~tokenbroker.jobs.events` (the SSE vocabulary and the
resumable event log). Imports nothing above the engine.
"""
