"""The event-id deduplication of the interaction state stays exact where duplicates can come
from, and bounded in memory everywhere else (services/scoring/interactions.py AppliedIds)."""

from __future__ import annotations

from services.scoring.interactions import EPOCH, AppliedIds, EventRecord, InteractionState

WEIGHTS = {1: 1.0, 2: 2.0, 3: 4.0, 4: 6.0, 5: 10.0}
DAY = 86400.0
T0 = 1_750_000_000.0


def test_ids_are_recognized_across_merges() -> None:
    ids = AppliedIds(capacity=1_000_000, protect_s=600.0, hot_size=8)
    for n in range(1000):
        assert f"e{n}" not in ids
        ids.add(f"e{n}", T0 + n, T0 + n, now=1000.0)
    assert len(ids) == 1000
    assert all(f"e{n}" in ids for n in range(1000))
    assert "e1000" not in ids and "other" not in ids


def test_old_ids_are_dropped_oldest_first_beyond_capacity() -> None:
    """Ids applied long ago (wall time) for events long before the newest one are forgotten
    once there are more than ``capacity``; the newest stay."""
    ids = AppliedIds(capacity=100, protect_s=60.0, hot_size=10)
    for n in range(5000):
        # One id per wall second, event times a day apart: nothing is protected for long.
        ids.add(f"e{n}", T0 + n * DAY, T0 + n * DAY, now=float(n))
        assert len(ids) <= 100 + 10 + 10 + 60, n  # capacity + hot + one merge + the wall-time window
    assert all(f"e{n}" in ids for n in range(4900, 5000))
    assert "e0" not in ids and "e3000" not in ids


def test_ids_the_archive_sync_can_reread_are_kept_beyond_capacity() -> None:
    """Within ``protect_s`` of the newest event time, or applied within ``protect_s`` of wall
    time, an id is never dropped: the archive sync re-reads exactly those windows."""
    by_event_time = AppliedIds(capacity=10, protect_s=600.0, hot_size=10)
    for n in range(500):  # all within 500 s of event time, applied over 5000 s of wall time
        by_event_time.add(f"t{n}", T0 + n, T0 + n, now=10.0 * n)
    assert len(by_event_time) == 500 and all(f"t{n}" in by_event_time for n in range(500))

    by_wall_time = AppliedIds(capacity=10, protect_s=600.0, hot_size=10)
    for n in range(500):  # event times a day apart, all applied within 500 s of wall time
        by_wall_time.add(f"w{n}", T0 + n * DAY, T0 + n * DAY, now=float(n))
    assert len(by_wall_time) == 500 and all(f"w{n}" in by_wall_time for n in range(500))


def test_event_times_out_of_int32_range_are_clamped_not_raised() -> None:
    ids = AppliedIds(capacity=10, protect_s=600.0, hot_size=2)
    for n, ts in enumerate((0.0, EPOCH - 1e12, EPOCH + 1e12, 1e300)):
        ids.add(f"x{n}", ts, max(ts, T0), now=0.0)
    assert all(f"x{n}" in ids for n in range(4))


def test_state_past_its_id_cap_still_counts_a_reread_window_once() -> None:
    """The old state cleared every id at its cap, so the archive sync's next re-read of its window
    (events of the last ``archive_slack_s``) counted all of them a second time."""
    state = InteractionState(WEIGHTS, 30 * DAY, max_event_ids=1000, id_window_s=700.0)
    evs = [EventRecord(f"e{n}", f"u{n % 50}", f"i{n % 70}", 1 + n % 5, T0 + n * 0.01) for n in range(40_000)]
    assert state.apply_all(evs) == 40_000
    before = {u: state.history(u) for u in state.users()}
    assert state.apply_all(evs) == 0  # the whole window again (as the archive sync reads it)
    assert state.apply_all(reversed(evs[-5000:])) == 0  # a Kafka replay of the newest
    assert state.events == 40_000
    assert {u: state.history(u) for u in state.users()} == before


def test_state_forgets_ids_outside_the_window_once_past_its_cap() -> None:
    """Old-time events applied long ago make room: memory is bounded by the cap, not by history."""
    state = InteractionState(WEIGHTS, 30 * DAY, max_event_ids=1000, id_window_s=0.0)
    evs = [EventRecord(f"h{n}", f"u{n % 50}", f"i{n % 70}", 1, T0 - 400 * DAY + n) for n in range(100_000)]
    state.apply_all(evs)
    state.apply(EventRecord("new", "u1", "i1", 5, T0))
    assert len(state._applied) <= 1000 + 2 * 32_768  # cap + the newest merge + the unmerged ids
    assert state.apply(EventRecord("new", "u1", "i1", 5, T0)) is False
    assert state.events == 100_001


def test_state_counts_its_pairs_and_ids_for_the_size_gauges() -> None:
    """The gauges a load run reads to tell designed growth from a leak: a repeated (user, item)
    adds no pair, a duplicate event adds nothing, a forgotten user takes their pairs along."""
    st = InteractionState(WEIGHTS, half_life_s=30 * DAY)
    evs = [("e1", "u1", "i1"), ("e2", "u1", "i1"), ("e3", "u1", "i2"), ("e4", "u2", "i1"), ("e4", "u2", "i1")]
    for eid, u, i in evs:
        st.apply(EventRecord(eid, u, i, 1, T0))
    assert (st.n_pairs, st.n_applied_ids) == (3, 4)
    st.forget("u1")
    assert (st.n_pairs, st.n_applied_ids) == (1, 4)
    st.forget("u1")
    assert st.n_pairs == 1


def test_a_duplicate_needs_a_rewrite_only_when_redis_is_behind_the_state() -> None:
    """The consumer skips the fold-in for a duplicate whose user this process already wrote from
    the same state and model; a restart (no marks), a newer event or a model swap rewrites."""
    st = InteractionState(WEIGHTS, half_life_s=30 * DAY)
    st.apply(EventRecord("e1", "u1", "i1", 1, T0))
    assert st.needs_write("u1", "m1")  # never written by this process: a crash replay must rewrite
    marks = st.write_marks(["u1"], "m1")
    st.mark_written(marks)
    assert not st.needs_write("u1", "m1")
    assert st.needs_write("u1", "m2")  # another model
    st.apply(EventRecord("e2", "u1", "i2", 1, T0))
    assert st.needs_write("u1", "m1")  # state moved on since the write
    early = st.write_marks(["u1"], "m1")
    st.apply(EventRecord("e3", "u1", "i3", 1, T0))  # applied while the output was being computed
    st.mark_written(early)
    assert st.needs_write("u1", "m1")
    st.mark_written(st.write_marks(["u1"], "m1"))
    st.forget("u1")
    assert "u1" not in st._written  # a forgotten user leaves no mark behind
