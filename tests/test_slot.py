"""A cache slot's states: the ranking behind health reports (worst, DEGRADED)."""

from __future__ import annotations

from tokenbroker.engine.slot import DEGRADED, SlotState, worst


def test_worst_orders_states_valid_to_reauthorization_required() -> None:
    """worst() ranks valid/empty < refreshing < stale < failed < reauthorization_required,
    and prefers valid to empty among good keys; DEGRADED holds stale and worse."""

    def slot(state: str) -> SlotState:
        return SlotState("p", state, state, None, None, None)

    order = ["valid", "refreshing", "stale", "failed", "reauthorization_required"]
    for i, state in enumerate(order):
        assert worst([slot(s) for s in reversed(order[: i + 1])]).state == state
        assert (state in DEGRADED) == (i >= 2)
    assert worst([slot("empty"), slot("valid"), slot("empty")]).state == "valid"
    assert worst([slot("empty")]).state == "empty"
