"""The kept-answer cache: exact under invalidation (unit tests of its rules) and, on a real Redis,
the user-change subscription that scoring's writes and ForgetUser publish to."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from stylerec.v1 import gateway_pb2

from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.privacy import delete_user_keys
from services.gateway.answers import STALE_S, AnswerCache, Provenance, UserChangeListener
from services.gateway.deadlines import Deadline

DL = Deadline(3600)  # no version check here waits for anything


def answer(item: str = "i1", **fields: object) -> gateway_pb2.GetRecommendationsResponse:
    resp = gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.CF, **fields)  # type: ignore[arg-type]
    resp.items.add(item_id=item)
    return resp


def live_cache(ttl_s: float = 60.0, entries: int = 100) -> AnswerCache:
    cache = AnswerCache(ttl_s, entries)
    cache.heard()
    return cache


def test_kept_until_the_user_changes() -> None:
    cache = live_cache()
    key = ("u_a", b"req")
    cache.put(key, cache.token("u_a"), answer(), 1)
    assert cache.get(key, DL) is not None
    cache.invalidate_users(["u_b"])
    assert cache.get(key, DL) is not None  # another user's change
    cache.invalidate_users(["u_a"])
    assert cache.get(key, DL) is None


def test_an_answer_built_across_a_change_is_not_kept() -> None:
    cache = live_cache()
    key = ("u_a", b"req")
    token = cache.token("u_a")  # taken before the Redis read
    cache.invalidate_users(["u_a"])  # scoring wrote the user while the answer was being built
    cache.put(key, token, answer(), 1)
    assert cache.get(key, DL) is None
    token = cache.token("u_a")
    cache.clear("item")  # so is one built across a catalog change
    cache.put(key, token, answer(), 1)
    assert cache.get(key, DL) is None


def test_degraded_answers_are_never_kept_pending_ones_briefly_and_entries_expire() -> None:
    cache = AnswerCache(0.4, 100, pending_ttl_s=0.1)
    cache.heard()
    cache.put(("u_a", b"1"), cache.token("u_a"), answer(degraded=True, degraded_reason="redis: timeout"), 1)
    pending = answer()
    pending.items[0].stylized_status = gateway_pb2.STYLIZED_PENDING
    cache.put(("u_a", b"2"), cache.token("u_a"), pending, 1)
    cache.put(("u_a", b"3"), cache.token("u_a"), answer(), 1)
    assert cache.get(("u_a", b"1"), DL) is None
    kept_pending, kept = cache.get(("u_a", b"2"), DL), cache.get(("u_a", b"3"), DL)
    assert kept_pending is not None and not kept_pending.restyle and kept is not None and not kept.restyle
    time.sleep(0.15)  # PENDING is re-asked as often as before: its READY must show
    due = cache.get(("u_a", b"2"), DL)
    assert due is not None and due.restyle and due.expires_at == kept_pending.expires_at
    assert (kept := cache.get(("u_a", b"3"), DL)) is not None and not kept.restyle
    # The restyled answer (still PENDING) is put back for the original lifetime only.
    cache.put(("u_a", b"2"), cache.token("u_a"), pending, 1, expires_at=due.expires_at)
    again = cache.get(("u_a", b"2"), DL)
    assert again is not None and not again.restyle and again.expires_at == due.expires_at
    cache.heard()
    time.sleep(0.3)
    assert cache.get(("u_a", b"3"), DL) is None and cache.get(("u_a", b"2"), DL) is None
    no_pending = AnswerCache(60.0, 100, pending_ttl_s=0.0)
    no_pending.heard()
    no_pending.put(("u_a", b"2"), no_pending.token("u_a"), pending, 1)
    assert no_pending.get(("u_a", b"2"), DL) is None


def test_nothing_is_served_or_kept_while_the_subscription_is_down() -> None:
    cache = AnswerCache(60.0, 100)  # not subscribed yet: a change could be missed
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 1)
    cache.heard()
    assert cache.get(("u_a", b"r"), DL) is None
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 1)
    assert cache.get(("u_a", b"r"), DL) is not None
    cache.heard(subscribed=False)  # lost
    assert cache.get(("u_a", b"r"), DL) is None
    cache.heard()
    cache._heard_at -= STALE_S  # subscribed but silent (Redis gone, no pong): not served either
    assert cache.get(("u_a", b"r"), DL) is None


def test_short_answers_are_not_kept() -> None:
    cache = live_cache()
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 2)  # one item of two asked: may fill any moment
    assert cache.get(("u_a", b"r"), DL) is None
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 1)
    assert cache.get(("u_a", b"r"), DL) is not None


def test_expired_answers_and_change_counters_are_swept() -> None:
    """One-visit shoppers are never invalidated: without the sweep their answers stayed until the
    bound (the gateway's RSS grew 3.8 MiB/min in a 10-minute make load)."""
    cache = live_cache(ttl_s=0.5)
    for n in range(50):
        cache.put((f"u_{n}", b"r"), cache.token(f"u_{n}"), answer(), 1)
    cache.invalidate_users([f"u_{n}" for n in range(50, 80)])
    assert len(cache) == 50 and len(cache._changes) == 30
    time.sleep(0.6)
    token = cache.token("u_new")
    cache.put(("u_new", b"r"), token, answer(), 1)  # the first put after a lifetime sweeps, then stores
    assert len(cache) == 1 and not cache._changes and set(cache._by_user) == {"u_new"}
    late = cache.token("u_late")  # taken before the next sweep: refused after it
    time.sleep(0.6)
    cache.heard()  # the listener's pongs
    cache.put(("u_other", b"r"), cache.token("u_other"), answer(), 1)
    cache.put(("u_late", b"r"), late, answer(), 1)
    assert cache.get(("u_late", b"r"), DL) is None and cache.get(("u_other", b"r"), DL) is not None


def test_bounded() -> None:
    cache = live_cache(entries=3)
    for n in range(5):
        cache.put((f"u_{n}", b"r"), cache.token(f"u_{n}"), answer(), 1)
    assert len(cache) <= 3


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_listener_follows_scoring_writes_and_forget_on_real_redis(infra: Stack, unique: str) -> None:
    r = redis.Redis.from_url(infra.redis_url)
    cache = AnswerCache(60.0, 100)
    listener = UserChangeListener(redis.Redis.from_url(infra.redis_url), cache, retry_s=0.1).start()
    try:
        assert wait_until(lambda: cache.live), "never subscribed"
        a, b = f"u_a{unique}", f"u_b{unique}"
        for u in (a, b):
            cache.put((u, b"r"), cache.token(u), answer(), 1)
        # What scoring's RecsWriter publishes in its MULTI/EXEC: space-separated pseudonyms.
        r.publish(keys.user_changes_channel(), f"{a} u_someone_else")
        assert wait_until(lambda: cache.get((a, b"r"), DL) is None)
        assert cache.get((b, b"r"), DL) is not None
        r.set(keys.recs(b), "x")
        assert delete_user_keys(r, b) == 1  # ForgetUser's deletion announces the user too
        assert wait_until(lambda: cache.get((b, b"r"), DL) is None)
    finally:
        listener.stop()
        r.close()
    assert not cache.live and len(cache) == 0  # stopping drops everything


class FakeSource:
    """A versioned input (a unit-test stand-in for a popularity list or the embedding index)."""

    def __init__(self) -> None:
        self.now: int | None = 1
        self.asked = 0

    def version(self, part: object, deadline: Deadline) -> int | None:
        self.asked += 1
        return self.now


def test_an_answer_is_outdated_when_an_input_it_was_built_from_moves() -> None:
    cache = live_cache()
    src = FakeSource()
    built = Provenance()
    built.used(src, ("", 50), 1)
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 1, built)
    kept = cache.get(("u_a", b"r"), DL)
    assert kept is not None and kept.depends == ((src, ("", 50), 1),) and src.asked == 1
    src.now = 2  # popularity moved: what a new build would see differs
    assert cache.get(("u_a", b"r"), DL) is None and len(cache) == 0
    cache.put(("u_a", b"r"), cache.token("u_a"), answer(), 1, built)
    src.now = None  # cannot be told (Redis down): rebuilt, never served on trust
    assert cache.get(("u_a", b"r"), DL) is None


def test_unversioned_answers_live_only_the_short_lifetime() -> None:
    cache = AnswerCache(60.0, 100, volatile_ttl_s=0.2)
    cache.heard()
    volatile = Provenance(volatile=True)
    cache.put(("u_a", b"scoring"), cache.token("u_a"), answer(), 1, volatile)
    cache.put(("u_a", b"redis"), cache.token("u_a"), answer(), 1, Provenance())
    assert cache.get(("u_a", b"scoring"), DL) is not None
    time.sleep(0.25)
    cache.heard()
    assert cache.get(("u_a", b"scoring"), DL) is None
    assert cache.get(("u_a", b"redis"), DL) is not None  # versions and invalidation cover it: kept on
    unknown = Provenance()
    unknown.used(FakeSource(), "x", None)  # a source that could not give its version makes it volatile
    assert unknown.volatile and not unknown.depends


def pending_answer(item: str, anchor: str) -> gateway_pb2.GetRecommendationsResponse:
    resp = answer(item, anchor_item_id=anchor)
    resp.items[0].stylized_status = gateway_pb2.STYLIZED_PENDING
    return resp


def test_an_announced_image_restyles_the_answers_that_showed_it_pending() -> None:
    cache = AnswerCache(60.0, 100, pending_ttl_s=30.0)
    cache.heard()
    cache.put(("u_a", b"r"), cache.token("u_a"), pending_answer("c1", "anchor"), 1)
    cache.put(("u_b", b"r"), cache.token("u_b"), pending_answer("c2", "anchor"), 1)
    assert not cache.get(("u_a", b"r"), DL).restyle  # type: ignore[union-attr]
    cache.stylized_ready([("c1", "other-style"), ("c1", "anchor")])
    a, b = cache.get(("u_a", b"r"), DL), cache.get(("u_b", b"r"), DL)
    assert a is not None and a.restyle and b is not None and not b.restyle
    # Announced while an answer was being read as PENDING: it is kept already due for a restyle.
    token = cache.token("u_c")
    cache.stylized_ready([("c3", "anchor")])
    cache.put(("u_c", b"r"), token, pending_answer("c3", "anchor"), 1)
    c = cache.get(("u_c", b"r"), DL)
    assert c is not None and c.restyle
    cache.put(("u_d", b"r"), cache.token("u_d"), pending_answer("c3", "anchor"), 1)  # read after it
    d = cache.get(("u_d", b"r"), DL)
    assert d is not None and not d.restyle


def test_listener_restyles_on_the_style_workers_announcement_on_real_redis(infra: Stack, unique: str) -> None:
    import json

    r = redis.Redis.from_url(infra.redis_url)
    cache = AnswerCache(60.0, 100, pending_ttl_s=30.0)
    heard: list[tuple[str, str]] = []
    listener = UserChangeListener(
        redis.Redis.from_url(infra.redis_url), cache, retry_s=0.1, on_stylized=heard.append
    ).start()
    try:
        assert wait_until(lambda: cache.live), "never subscribed"
        content, style = f"c{unique}", f"s{unique}"
        cache.put(("u_a", b"r"), cache.token("u_a"), pending_answer(content, style), 1)
        r.publish(keys.stylized_ready_channel(), "not json")  # skipped, the listener goes on
        r.publish(keys.stylized_ready_channel(), json.dumps([content, style]))  # what the style worker sends
        assert wait_until(lambda: (content, style) in heard)
        kept = cache.get(("u_a", b"r"), DL)
        assert kept is not None and kept.restyle and cache.live
    finally:
        listener.stop()
        r.close()
