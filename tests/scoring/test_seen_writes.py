"""The seen set on a real Redis: a consumer batch adds only its new items, and the set still ends
equal to the user's history whatever Redis held before (expired, drifted, fresh)."""

from __future__ import annotations

import redis
from prometheus_client import REGISTRY

from libs.common import keys
from services.scoring.foldin import SEEN_ADD_MAX, ModelHolder, Recommender, RecsWriter
from services.scoring.interactions import EventRecord, InteractionState

T0 = 1_750_000_000.0


def seen_in_redis(r: redis.Redis, user: str) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else m for m in r.smembers(keys.user_seen(user))}


def writes(how: str) -> float:
    return REGISTRY.get_sample_value("stylerec_scoring_seen_writes_total", {"how": how}) or 0.0


def test_batch_adds_only_new_items_and_the_set_always_equals_the_history(
    session_redis: redis.Redis, unique: str
) -> None:
    r = session_redis
    state = InteractionState({1: 1.0, 5: 10.0}, 30 * 86400)
    writer = RecsWriter(r, Recommender(state, ModelHolder()), top_n=5, ttl_s=600, exclude_seen=True, known_ttl_s=600)
    user = f"seen-{unique}"
    n = 0

    def apply(items: list[str]) -> dict[str, set[str]]:
        nonlocal n
        for i in items:
            n += 1
            state.apply(EventRecord(f"{unique}-{n}", user, i, 1, T0 + n))
        return {user: set(items)}

    writer.write_users([user], added=apply([f"i{k}" for k in range(40)]))  # no set yet: the 40 added make it whole
    assert seen_in_redis(r, user) == set(state.seen(user))

    added_before, whole_before = writes("added"), writes("whole")
    writer.write_users([user], added=apply(["i3", "new-1", "new-2"]))  # one already seen, two new
    assert seen_in_redis(r, user) == set(state.seen(user)) and len(state.seen(user)) == 42
    assert (writes("added") - added_before, writes("whole") - whole_before) == (1, 0)
    assert 0 < r.ttl(keys.user_seen(user)) <= 600

    # The set expired (or was lost): the count check catches it and the whole set is written again.
    r.delete(keys.user_seen(user))
    writer.write_users([user], added=apply(["new-3"]))
    assert seen_in_redis(r, user) == set(state.seen(user))
    assert writes("whole") - whole_before == 1

    # Drifted (an item missing, e.g. a write lost between two batches): rewritten whole as well.
    r.srem(keys.user_seen(user), "i7")
    writer.write_users([user], added=apply(["new-4"]))
    assert seen_in_redis(r, user) == set(state.seen(user))
    assert writes("whole") - whole_before == 2

    # A duplicate-only rewrite (nothing added) checks the size and leaves a correct set alone.
    writer.write_users([user], added={})
    assert seen_in_redis(r, user) == set(state.seen(user))
    assert writes("added") - added_before == 2

    # More new items than SEEN_ADD_MAX in one batch: whole rewrite without a script call.
    writer.write_users([user], added=apply([f"bulk-{k}" for k in range(SEEN_ADD_MAX + 1)]))
    assert seen_in_redis(r, user) == set(state.seen(user))
    assert writes("whole") - whole_before == 3


def test_one_script_writes_every_key_of_a_user(session_redis: redis.Redis, unique: str) -> None:
    """The per-user script (foldin.py WRITE_USER_LUA): a whole seen set larger than one SADD of the
    script takes (12,000 members, added in chunks), an empty list (the key is removed, not left
    stale), the meta and the known marker, each with its TTL."""
    r = session_redis
    state = InteractionState({1: 1.0}, 30 * 86400)
    writer = RecsWriter(r, Recommender(state, ModelHolder()), top_n=5, ttl_s=600, exclude_seen=True, known_ttl_s=900)
    user = f"script-{unique}"
    state.apply_all(EventRecord(f"{unique}-{k}", user, f"item-{k}", 1, T0 + k) for k in range(12_000))
    r.hset(keys.recs(user), mapping={"stale": "1.0"})
    writer.write_users([user])  # no ``added``: the whole set
    assert seen_in_redis(r, user) == set(state.seen(user)) and len(state.seen(user)) == 12_000
    assert 0 < r.ttl(keys.user_seen(user)) <= 600
    # The only shopper has seen every item: nothing is left to recommend, and the old list is gone.
    assert not r.exists(keys.recs(user))
    meta = {k.decode(): v.decode() for k, v in r.hgetall(keys.recs_meta(user)).items()}
    assert meta["model_version"] == "popularity-v1" and float(meta["updated_at"]) > 0
    assert 0 < r.ttl(keys.recs_meta(user)) <= 600
    assert r.get(keys.user_known(user)) == b"1" and 600 < r.ttl(keys.user_known(user)) <= 900

    other = f"script-other-{unique}"
    state.apply(EventRecord(f"{unique}-o", other, "item-1", 1, T0))
    writer.write_users([other], added={other: {"item-1"}})
    recs = {k.decode(): float(v) for k, v in r.hgetall(keys.recs(other)).items()}
    assert len(recs) == 5 and "item-1" not in recs
    assert 0 < r.ttl(keys.recs(other)) <= 600
