"""A real gateway process over gRPC, with Redis/MongoDB/GridFS seeded per docs/contracts.md
and stylize jobs read back from the real broker."""

from __future__ import annotations

import io
import time
from typing import Any

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer
from PIL import Image
from stylerec.v1 import common_pb2, gateway_pb2, style_pb2

from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.errors import violations_of
from libs.common.kafka import STYLE_JOBS
from services.gateway.answers import STALE_S
from tests.gateway.conftest import Gateway, Seeder, basis, png_bytes, pseudo, start_gateway

pytestmark = pytest.mark.integration


def recommend(
    gw: Gateway, user: str, k: int = 5, timeout: float = 5, **kw: Any
) -> gateway_pb2.GetRecommendationsResponse:
    return gw.stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=user, k=k, **kw), timeout=timeout)


def answer_cache_total(
    gw: Gateway, value: str, name: str = "stylerec_gateway_answer_cache_total", label: str = "result"
) -> float:
    """A labelled counter of the gateway's kept answers (default: ..._answer_cache_total{result})."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{gw.component.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get(label) == value
    )


def style_jobs_for(infra: Stack, content_ids: set[str], wait_s: float) -> list[style_pb2.StyleJob]:
    """Every StyleJob on the topic whose content item is one of ours (read from the start)."""
    consumer = KafkaConsumer(
        STYLE_JOBS,
        bootstrap_servers=[infra.kafka_bootstrap],
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )
    jobs: list[style_pb2.StyleJob] = []
    end = time.monotonic() + wait_s
    try:
        while time.monotonic() < end:
            for batch in consumer.poll(timeout_ms=300).values():
                for rec in batch:
                    job = style_pb2.StyleJob.FromString(rec.value)
                    if job.content_item_id in content_ids:
                        assert rec.key == job.content_item_id.encode()
                        jobs.append(job)
    finally:
        consumer.close()
    return jobs


def test_unknown_user_gets_popular(gateway: Gateway, seed: Seeder, unique: str) -> None:
    items = {f"pop-{unique}-{i}": 100.0 - i for i in range(5)}
    seed.popular(items)
    for i in items:
        seed.item(i)
    resp = recommend(gateway, f"stranger-{unique}", k=3)
    assert resp.strategy == gateway_pb2.POPULAR
    ours = [r.item_id for r in resp.items if r.item_id in items]
    assert ours == sorted(ours, key=lambda i: -items[i])
    assert not resp.degraded or "scoring" in resp.degraded_reason


def test_user_with_history_but_no_confident_style_gets_cf(gateway: Gateway, seed: Seeder, unique: str) -> None:
    user = f"shopper-{unique}"
    u = pseudo(user)
    ids = [f"cf-{unique}-{i}" for i in range(4)]
    for n, i in enumerate(ids):
        seed.item(i, title=f"Mug {n}", price=3.0 + n)
    seed.recs(u, {ids[0]: 0.9, ids[1]: 0.5, ids[2]: 0.1, ids[3]: 0.7}, version="als-v42")
    seed.seen(u, [f"bought-{unique}"])
    # A weak style profile stays below the threshold: CF, not the style path.
    seed.profile(u, basis(0), confidence=0.05, anchor=ids[0])
    resp = recommend(gateway, user, k=3)
    assert resp.strategy == gateway_pb2.CF
    assert resp.model_version == "als-v42"
    assert [r.item_id for r in resp.items] == [ids[3], ids[1], ids[2]]  # the anchor ids[0] is the user's own
    assert resp.items[0].title == "Mug 3" and resp.items[0].price == pytest.approx(6.0)
    assert all(r.stylized_status == gateway_pb2.STYLIZED_NOT_REQUESTED for r in resp.items)
    assert not resp.degraded
    # The catalog miss was filled into the Redis cache, with a TTL.
    assert gateway.redis.ttl(keys.item_meta(ids[3])) > 0


def test_filters_category_price_and_excludes(gateway: Gateway, seed: Seeder, unique: str) -> None:
    user = f"filter-{unique}"
    ids = [f"f-{unique}-{i}" for i in range(6)]
    for n, i in enumerate(ids):
        seed.item(i, category="mugs" if n % 2 == 0 else "lamps", price=float(n * 10))
    seed.recs(pseudo(user), {i: float(10 - n) for n, i in enumerate(ids)})
    resp = recommend(gateway, user, k=10, filters=gateway_pb2.Filters(category="mugs", min_price=5, max_price=45))
    assert [r.item_id for r in resp.items] == [ids[2], ids[4]]
    resp = recommend(gateway, user, k=10, filters=gateway_pb2.Filters(exclude_item_ids=[ids[0], ids[1]]))
    assert [r.item_id for r in resp.items] == ids[2:]


def test_style_path_reranks_enqueues_once_and_streams_ready_images(
    infra: Stack, gateway: Gateway, seed: Seeder, unique: str
) -> None:
    user = f"artlover-{unique}"
    u = pseudo(user)
    anchor = f"print-{unique}"
    seed.item(anchor, title="Starry print", category="art", photo=png_bytes((20, 30, 200)), embedding=basis(0))
    # CF prefers plain-a, but styled-b looks like the anchor (and plain-a clearly does not: the
    # default λ, 0.3, lifts a look only when the style gap outweighs the CF gap).
    plain, styled, nophoto = f"plain-{unique}", f"styled-{unique}", f"nophoto-{unique}"
    seed.item(plain, photo=png_bytes((200, 10, 10)), embedding=basis(0, mix=3.0, j=5))
    seed.item(styled, photo=png_bytes((10, 200, 10)), embedding=basis(0, mix=0.2))
    seed.item(nophoto, embedding=basis(0, mix=0.5))
    seed.recs(u, {plain: 1.0, styled: 0.8, nophoto: 0.1})
    seed.seen(u, [anchor])
    seed.profile(u, basis(0), confidence=0.9, anchor=anchor)

    # Popular items other tests seeded join the pool too (the style path adds them): look at ours.
    resp = recommend(gateway, user, k=10, want_stylized=True)
    assert resp.strategy == gateway_pb2.STYLE_PERSONALIZED
    assert resp.anchor_item_id == anchor and resp.style_confidence == pytest.approx(0.9)
    assert resp.style_lambda > 0
    order = [r.item_id for r in resp.items if r.item_id in (plain, styled, nophoto, anchor)]
    assert order[0] == styled and plain in order, order
    by_id = {r.item_id: r for r in resp.items}
    lam = resp.style_lambda
    for r in resp.items:
        assert r.final_score == pytest.approx((1 - lam) * r.cf_score + lam * r.style_affinity, abs=1e-6)
    assert by_id[styled].style_affinity > by_id[plain].style_affinity
    assert by_id[styled].stylized_status == gateway_pb2.STYLIZED_PENDING
    assert by_id[plain].stylized_status == gateway_pb2.STYLIZED_PENDING
    assert by_id[nophoto].stylized_status == gateway_pb2.STYLIZED_UNAVAILABLE  # nothing to draw
    assert anchor not in order

    # Asking again does not enqueue again (SET NX dedup), it reports pending.
    again = recommend(gateway, user, k=10, want_stylized=True)
    assert {r.item_id: r.stylized_status for r in again.items}[styled] == gateway_pb2.STYLIZED_PENDING
    jobs = style_jobs_for(infra, {styled, plain}, wait_s=4)
    assert sorted(j.content_item_id for j in jobs) == sorted([plain, styled])
    job = next(j for j in jobs if j.content_item_id == styled)
    assert job.kind == style_pb2.STYLIZE and job.style_item_id == anchor and job.user_id == u
    assert user not in job.SerializeToString().decode(errors="replace")  # raw id never leaves the gateway

    # The style worker's result (written per contract) turns the status to READY and streams back.
    image = png_bytes((1, 2, 3), size=300)
    ref = seed.stylized(styled, anchor, image)
    ready = recommend(gateway, user, k=10, want_stylized=True)
    item = {r.item_id: r for r in ready.items}[styled]
    assert item.stylized_status == gateway_pb2.STYLIZED_READY and item.stylized_image_ref == ref
    chunks = list(
        gateway.stub.GetStylizedImage(gateway_pb2.GetStylizedImageRequest(user_id=user, item_id=styled), timeout=5)
    )
    assert b"".join(c.data for c in chunks) == image
    assert chunks[0].content_type == "image/png" and chunks[0].total_size == len(image)

    with pytest.raises(grpc.RpcError) as err:
        list(gateway.stub.GetStylizedImage(gateway_pb2.GetStylizedImageRequest(user_id=user, item_id=nophoto)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_kept_pending_answer_is_restyled_not_rebuilt(
    gateway_factory: Any, mongo: Any, infra: Stack, unique: str
) -> None:
    """When the style worker announces a stored image, a kept answer that showed it PENDING asks
    Redis only for its images' states: READY shows at once (no timer: the re-check backstop here is
    60 s), and everything else is the kept answer (the ranking is not redone, the recs written
    meanwhile without a user-change message are not read)."""
    gw = gateway_factory(
        f"gw-restyle-{unique}",
        {
            "STYLEREC_ANSWER_CACHE_S": "120",
            "STYLEREC_ANSWER_PENDING_RECHECK_S": "60",
            "STYLEREC_STYLIZED_PENDING_RECHECK_S": "60",
        },
    )
    seed = Seeder(gw.redis, mongo)

    def cache_total(result: str) -> float:
        return answer_cache_total(gw, result)

    user = f"restyle-{unique}"
    u = pseudo(user)
    anchor, styled, other = f"ra-{unique}", f"rs-{unique}", f"ro-{unique}"
    seed.item(anchor, category="art", photo=png_bytes((20, 30, 200)), embedding=basis(0))
    seed.item(styled, photo=png_bytes((10, 200, 10)), embedding=basis(0, mix=0.2))
    seed.item(other, photo=png_bytes((200, 10, 10)), embedding=basis(0, mix=3.0, j=5))
    seed.recs(u, {styled: 0.9, other: 0.8})
    seed.seen(u, [anchor])
    seed.profile(u, basis(0), confidence=0.9, anchor=anchor)
    # Kept answers start once the new gateway's user-change subscription is live, and the
    # seeder's change messages reach it asynchronously (each drops the user's answers): ask until
    # a repeat a moment later is served as kept.
    deadline = time.monotonic() + 20
    while True:
        first = recommend(gw, user, k=2, want_stylized=True)
        hits = cache_total("hit")
        time.sleep(0.3)
        recommend(gw, user, k=2, want_stylized=True)
        if cache_total("hit") > hits:
            break
        assert time.monotonic() < deadline, "the answer was never kept"
        time.sleep(0.3)
    assert first.strategy == gateway_pb2.STYLE_PERSONALIZED and not first.degraded
    pending = {r.item_id for r in first.items if r.stylized_status == gateway_pb2.STYLIZED_PENDING}
    assert styled in pending, first
    before = cache_total("restyle")
    # Recs rewritten without the user-change message scoring would publish: a rebuild would see
    # them, a restyle must not (it changes only the images' states).
    gw.redis.delete(keys.recs(u))
    still = recommend(gw, user, k=2, want_stylized=True)  # kept, nothing announced: PENDING, no Redis read
    assert still.items[0].stylized_status == first.items[0].stylized_status and cache_total("restyle") == before
    ref = seed.stylized(styled, anchor, png_bytes((1, 2, 3), size=64))  # stored and announced
    deadline = time.monotonic() + 5
    while cache_total("restyle") == before:  # the announcement reaches the listener asynchronously
        ready = recommend(gw, user, k=2, want_stylized=True)
        assert time.monotonic() < deadline, "the announcement never restyled the kept answer"
        time.sleep(0.05)
    by_id = {r.item_id: r for r in ready.items}
    assert by_id[styled].stylized_status == gateway_pb2.STYLIZED_READY and by_id[styled].stylized_image_ref == ref
    assert all(by_id[i].stylized_status == gateway_pb2.STYLIZED_PENDING for i in pending - {styled})
    assert [(r.item_id, r.final_score) for r in ready.items] == [(r.item_id, r.final_score) for r in first.items]
    assert ready.recommendation_id != first.recommendation_id and not ready.degraded
    assert cache_total("restyle") == before + 1


def test_kept_answers_follow_popularity_moves_and_outlive_the_popularity_bound_otherwise(
    gateway_factory: Any, mongo: Any, unique: str
) -> None:
    """A kept answer built from a popularity list is rebuilt once the list's content moves (its
    version, checked on the hit after the near cache's 0.5 s), not on a timer; a CF answer from
    the user's recs stays kept past that bound, because only the user's change message or an
    item update can change it."""
    gw = gateway_factory(
        f"gw-versions-{unique}", {"STYLEREC_POPULAR_NEAR_CACHE_S": "0.5", "STYLEREC_ANSWER_CACHE_S": "60"}
    )
    seed = Seeder(gw.redis, mongo)

    def everything_dropped() -> float:
        # item-updates of other tests on the shared broker, or a resubscription, drop every kept
        # answer (by design): an attempt during which that happened proves nothing either way.
        return sum(
            answer_cache_total(gw, reason, "stylerec_gateway_answer_cache_invalidations_total", "reason")
            for reason in ("item", "resubscribed", "unsubscribed")
        )

    def attempt(n: int) -> bool:
        cat = f"cat-{unique}-{n}"
        a, b, c = (f"pv-{x}-{unique}-{n}" for x in "abc")
        for item in (a, b, c):
            seed.item(item, category=cat)
        seed.popular({a: 3.0, b: 2.0}, category=cat)
        stranger = f"pv-stranger-{unique}-{n}"  # never seen by scoring: answered from popularity
        shopper = f"pv-shopper-{unique}-{n}"
        seed.recs(pseudo(shopper), {b: 0.9, c: 0.8})

        def ask(user: str) -> list[str]:
            resp = recommend(gw, user, k=2, filters=gateway_pb2.Filters(category=cat))
            assert not resp.degraded, resp
            return [r.item_id for r in resp.items]

        deadline = time.monotonic() + 20
        while True:  # kept once the subscription is live and the seeder's change message has passed
            assert ask(stranger) == [a, b] and ask(shopper) == [b, c]
            hits = answer_cache_total(gw, "hit")
            ask(stranger), ask(shopper)
            if answer_cache_total(gw, "hit") >= hits + 2:
                break
            assert time.monotonic() < deadline, "the answers were never kept"
            time.sleep(0.3)
        dropped = everything_dropped()
        time.sleep(0.7)  # past the popularity near cache: a hit asks Redis for the list's version
        hits, outdated = answer_cache_total(gw, "hit"), answer_cache_total(gw, "outdated")
        assert ask(stranger) == [a, b] and ask(shopper) == [b, c]  # nothing moved
        kept_both = answer_cache_total(gw, "hit") == hits + 2 and answer_cache_total(gw, "outdated") == outdated
        seed.popular({c: 5.0}, category=cat)  # popularity moves; no user changed
        time.sleep(0.7)
        assert ask(stranger) == [c, a]  # whatever else happened, the moved list shows
        rebuilt = answer_cache_total(gw, "outdated") == outdated + 1
        assert ask(shopper) == [b, c]
        shopper_kept = answer_cache_total(gw, "hit") == hits + 3
        if everything_dropped() != dropped:
            return False
        assert kept_both and rebuilt and shopper_kept, (kept_both, rebuilt, shopper_kept)
        return True

    assert any(attempt(n) for n in range(4)), "every attempt was disturbed by a drop of all kept answers"


def test_stylized_image_streams_in_chunks_and_rate_limit(
    infra: Stack, gateway_factory: Any, mongo: Any, unique: str
) -> None:
    gw = gateway_factory(
        f"gw-rate-{unique}", {"STYLEREC_STYLIZE_RATE_PER_USER": "2", "STYLEREC_IMAGE_CHUNK_BYTES": "1024"}
    )
    seed = Seeder(gw.redis, mongo)
    user = f"greedy-{unique}"
    u = pseudo(user)
    anchor = f"anchor-{unique}"
    seed.item(anchor, photo=png_bytes((9, 9, 9)), embedding=basis(1))
    ids = [f"r-{unique}-{i}" for i in range(4)]
    for i in ids:
        seed.item(i, photo=png_bytes((50, 60, 70)), embedding=basis(1, mix=0.1, j=2))
    seed.recs(u, {i: 1.0 - n * 0.1 for n, i in enumerate(ids)})
    seed.profile(u, basis(1), confidence=1.0, anchor=anchor)
    resp = recommend(gw, user, k=4, want_stylized=True)
    statuses = [r.stylized_status for r in resp.items]
    assert statuses.count(gateway_pb2.STYLIZED_PENDING) == 2
    assert statuses.count(gateway_pb2.STYLIZED_UNAVAILABLE) == 2

    big = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    seed.stylized(ids[0], anchor, buf.getvalue())
    chunks = list(
        gw.stub.GetStylizedImage(
            gateway_pb2.GetStylizedImageRequest(user_id=user, item_id=ids[0], style_item_id=anchor), timeout=5
        )
    )
    assert len(chunks) > 3 and all(len(c.data) <= 1024 for c in chunks)
    assert b"".join(c.data for c in chunks) == buf.getvalue()


def test_similar_items_style_and_degraded_cf(gateway: Gateway, seed: Seeder, unique: str) -> None:
    a, near, far = f"sa-{unique}", f"sn-{unique}", f"sf-{unique}"
    seed.item(a, embedding=basis(7))
    seed.item(near, embedding=basis(7, mix=0.1, j=8))
    seed.item(far, embedding=basis(9))
    resp = gateway.stub.GetSimilarItems(
        gateway_pb2.GetSimilarItemsRequest(item_id=a, k=50, mode=gateway_pb2.SIMILARITY_STYLE), timeout=5
    )
    ids = [r.item_id for r in resp.items]
    # The index may be up to embedding_index_refresh_s old; a fresh gateway loads it on first use.
    assert a not in ids
    if near in ids and far in ids:
        assert ids.index(near) < ids.index(far)
    cf = gateway.stub.GetSimilarItems(
        gateway_pb2.GetSimilarItemsRequest(item_id=a, k=5, mode=gateway_pb2.SIMILARITY_CF), timeout=5
    )
    assert cf.degraded and "scoring" in cf.degraded_reason and not cf.items
    missing = gateway.stub.GetSimilarItems(
        gateway_pb2.GetSimilarItemsRequest(item_id=f"none-{unique}", k=5, mode=gateway_pb2.SIMILARITY_STYLE), timeout=5
    )
    assert missing.degraded and "no style embedding" in missing.degraded_reason


def test_similar_items_style_on_fresh_gateway(gateway_factory: Any, mongo: Any, unique: str) -> None:
    gw = gateway_factory(f"gw-sim-{unique}")
    seed = Seeder(gw.redis, mongo)
    a, near, far = f"xa-{unique}", f"xn-{unique}", f"xf-{unique}"
    seed.item(a, embedding=basis(11))
    seed.item(near, embedding=basis(11, mix=0.1, j=12))
    seed.item(far, embedding=basis(13))
    for mode in (gateway_pb2.SIMILARITY_STYLE, gateway_pb2.SIMILARITY_BLEND):
        resp = gw.stub.GetSimilarItems(gateway_pb2.GetSimilarItemsRequest(item_id=a, k=200, mode=mode), timeout=5)
        ids = [r.item_id for r in resp.items]
        assert ids[0] == near, (mode, ids[:5])
        assert ids.index(near) < ids.index(far)


def test_bad_requests_get_invalid_argument_with_details(gateway: Gateway) -> None:
    cases = [
        (gateway_pb2.GetRecommendationsRequest(user_id="", k=5), "user_id"),
        (gateway_pb2.GetRecommendationsRequest(user_id="u", k=100_000), "k"),
        (
            gateway_pb2.GetRecommendationsRequest(user_id="u", filters=gateway_pb2.Filters(min_price=-1)),
            "filters.min_price",
        ),
        (
            gateway_pb2.GetRecommendationsRequest(user_id="u", filters=gateway_pb2.Filters(min_price=9, max_price=2)),
            "filters.max_price",
        ),
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            gateway.stub.GetRecommendations(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in violations_of(err.value)]
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.GetSimilarItems(gateway_pb2.GetSimilarItemsRequest(item_id=""), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(gateway.stub.GetStylizedImage(gateway_pb2.GetStylizedImageRequest(user_id="u"), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_redis_stopped_still_answers_degraded(infra: Stack, own_redis: Any, mongo: Any, unique: str) -> None:
    gw = start_gateway(infra, f"gw-noredis-{unique}", {"STYLEREC_REDIS_URL": own_redis.url})
    try:
        seed = Seeder(gw.redis, mongo)
        items = {f"np-{unique}-{i}": 10.0 - i for i in range(3)}
        seed.popular(items)
        for i in items:
            seed.item(i, title=f"Candle {i}")
        seed.recs(pseudo(f"known-{unique}"), {f"np-{unique}-2": 1.0})
        healthy = recommend(gw, f"anyone-{unique}", k=3)
        assert healthy.strategy == gateway_pb2.POPULAR and not healthy.degraded
        own_redis.stop()
        # An answer kept from before may be served until the user-change subscription has been
        # silent for STALE_S (nothing can change it meanwhile: its writers need this Redis too).
        time.sleep(STALE_S)
        for user in (f"anyone-{unique}", f"known-{unique}"):
            t0 = time.monotonic()
            resp = recommend(gw, user, k=3, timeout=3)
            assert time.monotonic() - t0 < 2.0
            assert resp.degraded and "redis" in resp.degraded_reason
            assert resp.strategy == gateway_pb2.POPULAR
            # The last popularity list this replica saw, with titles from MongoDB.
            assert [r.item_id for r in resp.items] == list(items)
            assert resp.items[0].title.startswith("Candle")
        sim = gw.stub.GetSimilarItems(gateway_pb2.GetSimilarItemsRequest(item_id="x", k=3), timeout=3)
        assert sim.degraded
    finally:
        gw.channel.close()
        infra.stop_component(gw.component.name)


def test_deadlines_honoured_with_a_hung_scoring(infra: Stack, blackhole: str, unique: str) -> None:
    gw = start_gateway(
        infra,
        f"gw-hung-{unique}",
        {"STYLEREC_SCORING_ADDR": blackhole, "STYLEREC_SCORING_TIMEOUT_S": "5", "STYLEREC_DEFAULT_DEADLINE_S": "0.8"},
    )
    try:
        # A shopper scoring never saw (no recs, no user_known marker) is answered from
        # popularity without asking scoring at all: not slowed or degraded by a hung scoring.
        t0 = time.monotonic()
        stranger = recommend(gw, f"stranger-{unique}", k=3, timeout=5)
        assert time.monotonic() - t0 < 0.3 and not stranger.degraded and stranger.strategy == gateway_pb2.POPULAR
        # Scoring knows these users, but their recs expired from Redis → the gateway asks scoring,
        # which never answers.
        for u in (f"idle-{unique}", f"idle2-{unique}"):
            gw.redis.set(keys.user_known(pseudo(u)), b"1")  # as scoring's writes leave it
        for caller_deadline in (0.3, 0.6):
            t0 = time.monotonic()
            resp = recommend(gw, f"idle-{unique}", k=3, timeout=caller_deadline)
            took = time.monotonic() - t0
            assert took < caller_deadline, took
            assert resp.degraded and "scoring" in resp.degraded_reason
            assert resp.strategy == gateway_pb2.POPULAR
        # Without a caller deadline the configured budget applies (0.8 s), not the 5 s scoring cap.
        time.sleep(1.1)  # let the breaker close so scoring is tried again
        t0 = time.monotonic()
        resp = recommend(gw, f"idle2-{unique}", k=3, timeout=None)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 1.5
        assert resp.degraded and "scoring" in resp.degraded_reason
    finally:
        gw.channel.close()
        infra.stop_component(gw.component.name)


def test_narrow_shelf_is_topped_up_from_category_popularity(gateway: Gateway, seed: Seeder, unique: str) -> None:
    user = f"shelf-{unique}"
    gifts = [f"g-{unique}-{i}" for i in range(3)]
    photos = [f"p-{unique}-{i}" for i in range(3)]
    for i in gifts:
        seed.item(i, category="gift")
    for i in photos:
        seed.item(i, category=f"photo-{unique}")
    seed.recs(pseudo(user), {i: 1.0 for i in gifts})
    seed.popular({p: 10.0 - n for n, p in enumerate(photos)}, category=f"photo-{unique}")
    resp = recommend(gateway, user, k=2, filters=gateway_pb2.Filters(category=f"photo-{unique}"))
    assert resp.strategy == gateway_pb2.CF
    assert [r.item_id for r in resp.items] == photos[:2]


def test_catalog_change_invalidates_cached_metadata(infra: Stack, gateway: Gateway, seed: Seeder, unique: str) -> None:
    from libs.common.kafka import ITEM_UPDATES, ProtoProducer

    user = f"pricey-{unique}"
    item = f"lamp-{unique}"
    seed.item(item, title="Lamp", price=10.0)
    seed.recs(pseudo(user), {item: 1.0})
    assert recommend(gateway, user, k=1).items[0].price == pytest.approx(10.0)
    assert gateway.redis.exists(keys.item_meta(item))
    seed.db["items"].update_one({"_id": item}, {"$set": {"price": 12.5}})
    producer = ProtoProducer([infra.kafka_bootstrap], client_id="test-catalog")
    try:
        end = time.monotonic() + 45
        price = 10.0
        while time.monotonic() < end:
            # Repeated until seen: the gateway's group may still be joining (it starts at "latest").
            producer.send_and_wait(ITEM_UPDATES, item, common_pb2.ItemUpdate(item_id=item))
            time.sleep(1.0)
            # The in-process copy lives item_near_cache_s (5 s) after the Redis entry is gone.
            price = recommend(gateway, user, k=1).items[0].price
            if price == pytest.approx(12.5):
                break
        assert price == pytest.approx(12.5)
    finally:
        producer.close()
