"""Pure parts of the gateway: the style blend, budgets and breakers."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from stylerec.v1 import common_pb2

from services.gateway.deadlines import Breaker, Deadline, DependencyUnavailable
from services.gateway.style import (
    StyleProfile,
    decode_embedding,
    encode_embedding,
    impute,
    normalize_cf,
    rerank,
)


def test_normalize_cf_min_max_and_ties() -> None:
    assert normalize_cf([4.0, 2.0, 0.0]) == [1.0, 0.5, 0.0]
    assert normalize_cf([3.0, 3.0]) == [1.0, 1.0]
    assert normalize_cf([]) == []


def test_embedding_roundtrip_and_rejects_bad_sizes() -> None:
    v = np.arange(1, 101, dtype=np.float32)
    out = decode_embedding(encode_embedding(v))
    assert out is not None and abs(float(np.linalg.norm(out)) - 1.0) < 1e-5
    assert decode_embedding(b"\x00" * 12) is None
    assert decode_embedding(np.zeros(100, dtype="<f4").tobytes()) is None
    with pytest.raises(ValueError):
        encode_embedding([1.0, 2.0])


def test_missing_embeddings_get_neutral_affinity() -> None:
    aff, imputed = impute([1.0, None, 0.0])
    assert imputed == 1
    assert aff == [1.0, 0.5, 0.0]


def test_rerank_lambda_zero_is_cf_order_and_one_is_style_order() -> None:
    e = np.eye(100, dtype=np.float32)
    profile = e[0]
    cands = [("a", 3.0), ("b", 2.0), ("c", 1.0)]
    embs = {"a": e[1], "b": e[2], "c": e[0]}
    assert [r[0] for r in rerank(cands, profile, embs, 0.0)] == ["a", "b", "c"]
    assert rerank(cands, profile, embs, 1.0)[0][0] == "c"
    mid = rerank(cands, profile, embs, 0.6)
    by_id = {r[0]: r for r in mid}
    assert by_id["c"][3] == pytest.approx(0.4 * 0.0 + 0.6 * 1.0)
    assert by_id["a"][3] == pytest.approx(0.4 * 1.0 + 0.6 * 0.0)


def test_profile_parsing_and_confidence() -> None:
    raw = {b"vector": encode_embedding(np.ones(100)), b"confidence": b"0.7", b"anchor": b"print-1"}
    p = StyleProfile.from_redis(raw)
    assert p is not None and p.is_confident(0.5) and not p.is_confident(0.8)
    assert StyleProfile.from_redis({b"confidence": b"0.9"}) is None
    no_anchor = StyleProfile.from_redis({**raw, b"anchor": b""})
    assert no_anchor is not None and not no_anchor.is_confident(0.1)
    garbage = StyleProfile.from_redis({**raw, b"confidence": b"lots"})
    assert garbage is not None and garbage.confidence == 0.0


def test_deadline_caps_timeouts() -> None:
    d = Deadline(0.2, reserve_s=0.05)
    assert d.timeout(10.0) <= 0.15
    assert d.timeout(0.01) == 0.01
    assert Deadline.from_context(None, 1.0, 0.0).remaining() > 0.9
    assert Deadline.from_context(0.1, 1.0, 0.0).remaining() <= 0.1
    assert Deadline.from_context(1e18, 1.0, 0.0).remaining() <= 1.0
    assert Deadline.from_context(5.0, 1.0, 0.0).remaining() > 4.0


def test_breaker_opens_after_failure_and_recovers() -> None:
    b = Breaker("redis", open_s=0.1)
    d = Deadline(5)

    def boom() -> int:
        raise ConnectionError("refused")

    with pytest.raises(DependencyUnavailable):
        b.call(boom, d)
    with pytest.raises(DependencyUnavailable, match="skipped after recent failure"):
        b.call(lambda: 1, d)
    time.sleep(0.12)
    assert b.call(lambda: 1, d) == 1


def test_breaker_refuses_without_budget() -> None:
    b = Breaker("scoring", open_s=1)
    with pytest.raises(DependencyUnavailable, match="no time left"):
        b.call(lambda: 1, Deadline(0.0))


def test_breaker_stays_closed_when_the_dependency_answered_with_an_error() -> None:
    b = Breaker("scoring", open_s=60)

    def not_found() -> int:
        raise LookupError("item unknown to the model")

    with pytest.raises(DependencyUnavailable, match="item unknown"):
        b.call(not_found, Deadline(5), is_failure=lambda e: not isinstance(e, LookupError))
    assert not b.is_open() and b.call(lambda: 7, Deadline(5)) == 7


# ---------- experiments and impressions ----------
def test_arm_assignment_is_deterministic_weighted_and_reshuffled_by_the_salt() -> None:
    from services.gateway.config import ExperimentArm
    from services.gateway.experiments import Experiments

    arms = (ExperimentArm(name="a"), ExperimentArm(name="b", weight=3))
    exp = Experiments("e1", "s1", arms)
    users = [f"u_{n:032x}" for n in range(4000)]
    first = [exp.assign(u).arm_name for u in users]
    assert first == [Experiments("e1", "s1", arms).assign(u).arm_name for u in users]  # another replica agrees
    share_b = first.count("b") / len(first)
    assert 0.72 < share_b < 0.78  # weight 3 of 4
    other = [Experiments("e1", "s2", arms).assign(u).arm_name for u in users]
    assert 0.3 < sum(x != y for x, y in zip(first, other, strict=True)) / len(users) < 0.5
    assert Experiments("", "", ()).assign(users[0]).arm is None


def test_experiment_settings_are_validated() -> None:
    from pydantic import ValidationError

    from services.gateway.config import GatewaySettings

    ok = GatewaySettings(experiment_name="e", experiment_arms=[{"name": "cf", "style": False}, {"name": "s"}])  # type: ignore[arg-type]
    assert [a.name for a in ok.experiment_arms] == ["cf", "s"]
    for bad in (
        {"experiment_name": "e", "experiment_arms": [{"name": "only"}]},
        {"experiment_arms": [{"name": "a"}, {"name": "b"}]},
        {"experiment_name": "e", "experiment_arms": [{"name": "a"}, {"name": "a"}]},
        {"experiment_name": "e", "experiment_arms": [{"name": "a", "style_lambda": 2}, {"name": "b"}]},
        {"experiment_name": "e", "experiment_arms": [{"name": "a", "colour": "red"}, {"name": "b"}]},
        {"experiment_name": "e", "experiment_arms": [{"name": "a b"}, {"name": "b"}]},
    ):
        with pytest.raises(ValidationError):
            GatewaySettings(**bad)  # type: ignore[arg-type]


class FakeProducer:
    """Stands in for the broker client in a unit test: records sends; acknowledges at once."""

    def __init__(self, block_s: float = 0.0, partitions: int = 6) -> None:
        self.sent: list[tuple[str, str, object]] = []
        self.partitions_sent: list[int | None] = []
        self.block_s = block_s
        self.partitions = partitions

    def partition_count(self, topic: str) -> int:
        return self.partitions

    def send(self, topic: str, key: str, message: object) -> object:
        time.sleep(self.block_s)
        self.sent.append((topic, key, message))
        return self._done()

    def send_raw(self, topic: str, key: bytes, value: bytes, partition: int | None = None) -> object:
        from stylerec.v1 import common_pb2

        time.sleep(self.block_s)
        self.sent.append((topic, key.decode(), common_pb2.ImpressionBatch.FromString(value)))
        self.partitions_sent.append(partition)
        return self._done()

    @staticmethod
    def _done() -> object:

        class Done:
            def add_callback(self, fn: object) -> None:
                fn(None)  # type: ignore[operator]

            def add_errback(self, fn: object) -> None:
                pass

        return Done()

    def flush(self, timeout_s: float | None = None) -> None:
        pass

    def close(self, timeout_s: float = 5) -> None:
        pass


def test_impressions_never_block_the_answer_and_overflow_is_counted() -> None:
    from prometheus_client import REGISTRY
    from stylerec.v1 import gateway_pb2

    from services.gateway.config import GatewaySettings
    from services.gateway.experiments import NO_EXPERIMENT
    from services.gateway.impressions import ImpressionPublisher

    def dropped() -> float:
        return REGISTRY.get_sample_value("stylerec_gateway_impressions_dropped_total", {"reason": "queue_full"}) or 0.0

    slow = FakeProducer(block_s=0.5)  # a broker that takes 0.5 s per send
    pub = ImpressionPublisher(GatewaySettings(impressions_queue=5), lambda: slow).start()  # type: ignore[arg-type,return-value]
    before = dropped()
    t0 = time.perf_counter()
    for _ in range(50):
        resp = gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.CF, model_version="m")
        resp.items.add(item_id="a")
        pub.stamp(resp, "u_" + "0" * 32, NO_EXPERIMENT)
    assert time.perf_counter() - t0 < 0.2  # 50 answers, no waiting on the 0.5 s sends
    assert dropped() - before >= 40
    pub.stop()
    topic, key, batch = slow.sent[0]
    imp = batch.impressions[0]  # type: ignore[attr-defined]
    assert topic == "impressions" and key == "u_" + "0" * 32
    assert imp.strategy == "CF" and [i.item_id for i in imp.items] == ["a"]


def test_impressions_go_one_record_per_partition_keyed_into_it() -> None:
    """A record per answer cost more than building it; a batch per partition keeps each user's
    impressions in the partition their key hashes to, and splits before a record grows large."""
    from stylerec.v1 import gateway_pb2

    from libs.common.kafka import partition_of
    from services.gateway.impressions import RECORD_BYTES, Record, Shown, batch_by_partition

    def shown(n: int, items: int = 3) -> Shown:
        resp = gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.CF, model_version="m")
        for i in range(items):
            resp.items.add(item_id=f"i{n}-{i}")
        return Shown(f"u_{n:032x}", resp.SerializeToString(), f"rec_{n:032x}", 1_700_000_000.0 + n)

    def parsed(records: list[Record]) -> list[common_pb2.ImpressionBatch]:
        return [common_pb2.ImpressionBatch.FromString(r.value) for r in records]

    answers = [shown(n) for n in range(60)]
    records = batch_by_partition(answers, 6)
    batches = parsed(records)
    assert len(batches) == len({partition_of(a.user, 6) for a in answers}) <= 6
    got = [imp for b in batches for imp in b.impressions]
    assert sorted(i.recommendation_id for i in got) == sorted(f"rec_{n:032x}" for n in range(60))
    for r, b in zip(records, batches, strict=True):
        assert r.key == b.impressions[0].user_id and r.impressions == len(b.impressions)
        assert {partition_of(i.user_id, 6) for i in b.impressions} == {partition_of(r.key, 6)} == {r.partition}
        assert r.counts == {("", "", "CF"): len(b.impressions)}
    first = next(i for i in got if i.recommendation_id == f"rec_{7:032x}")
    assert [(it.item_id, it.position) for it in first.items] == [("i7-0", 0), ("i7-1", 1), ("i7-2", 2)]
    assert first.strategy == "CF" and first.shown_at.seconds == 1_700_000_007 and first.user_id == f"u_{7:032x}"
    assert first.model_version == "m"
    # Answers of one user that together pass RECORD_BYTES go in more than one record, each at
    # most RECORD_BYTES plus one impression.
    one = len(batch_by_partition([shown(0, items=1000)], 6)[0].value)
    big = [shown(0, items=1000)] * (2 * RECORD_BYTES // one + 1)
    split = batch_by_partition(big, 6)
    assert len(split) >= 2 and sum(r.impressions for r in split) == len(big)
    assert sum(len(b.impressions) for b in parsed(split)) == len(big)
    assert all(RECORD_BYTES <= len(r.value) <= RECORD_BYTES + one for r in split[:-1])
    assert len(split[-1].value) <= RECORD_BYTES + one


def test_an_impression_is_the_shared_body_merged_with_the_views_id_and_time() -> None:
    """Views of one kept answer share the body; each impression equals one built field by field."""
    from stylerec.v1 import gateway_pb2

    from services.gateway.impressions import Shown, impression_body, impression_bytes

    resp = gateway_pb2.GetRecommendationsResponse(
        strategy=gateway_pb2.STYLE_PERSONALIZED, model_version="ease-7", experiment="exp", experiment_arm="b"
    )
    for i in range(3):
        resp.items.add(item_id=f"it{i}", title="long title that is not in the impression")
    answer = resp.SerializeToString()
    body, counter = impression_body("u_x", answer)
    assert counter == ("exp", "b", "STYLE_PERSONALIZED")
    for n in range(2):
        got = common_pb2.Impression.FromString(impression_bytes(body, Shown("u_x", answer, f"rec_{n}", 1.5 + n)))
        want = common_pb2.Impression(
            recommendation_id=f"rec_{n}",
            user_id="u_x",
            strategy="STYLE_PERSONALIZED",
            experiment="exp",
            arm="b",
            model_version="ease-7",
        )
        for pos in range(3):
            want.items.add(item_id=f"it{pos}", position=pos)
        want.shown_at.FromNanoseconds(int((1.5 + n) * 1e9))
        assert got == want


def test_impressions_without_a_broker_are_dropped_and_counted() -> None:
    from prometheus_client import REGISTRY
    from stylerec.v1 import gateway_pb2

    from services.gateway.config import GatewaySettings
    from services.gateway.experiments import NO_EXPERIMENT
    from services.gateway.impressions import ImpressionPublisher

    def no_broker() -> object:
        raise ConnectionError("NoBrokersAvailable")

    def dropped() -> float:
        return REGISTRY.get_sample_value("stylerec_gateway_impressions_dropped_total", {"reason": "broker"}) or 0.0

    before = dropped()
    pub = ImpressionPublisher(GatewaySettings(), no_broker).start()  # type: ignore[arg-type]
    pub.stamp(gateway_pb2.GetRecommendationsResponse(), "u_" + "1" * 32, NO_EXPERIMENT)
    deadline = time.monotonic() + 5
    while dropped() - before < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dropped() - before == 1
    pub.stop()


def test_impressions_are_grouped_by_the_topics_own_partition_count() -> None:
    """A topic created with another count than the default layout's 6 (here 4, which 6 does not
    refine) still gets each shopper's impressions in one partition, in order: the publisher asks
    the producer for the count and sends every record to its partition explicitly."""
    from stylerec.v1 import gateway_pb2

    from libs.common.kafka import partition_of
    from services.gateway.config import GatewaySettings
    from services.gateway.experiments import NO_EXPERIMENT
    from services.gateway.impressions import ImpressionPublisher

    four = FakeProducer(partitions=4)
    pub = ImpressionPublisher(GatewaySettings(impressions_linger_ms=0), lambda: four).start()  # type: ignore[arg-type,return-value]
    users = [f"u_{n:032x}" for n in range(40)]
    for _ in range(3):
        for u in users:
            resp = gateway_pb2.GetRecommendationsResponse(strategy=gateway_pb2.CF, model_version="m")
            resp.items.add(item_id="a")
            pub.stamp(resp, u, NO_EXPERIMENT)
    pub.stop()
    seen = 0
    for (_topic, key, batch), partition in zip(four.sent, four.partitions_sent, strict=True):
        assert partition is not None and 0 <= partition < 4 and partition_of(key, 4) == partition
        for imp in batch.impressions:  # type: ignore[attr-defined]
            assert partition_of(imp.user_id, 4) == partition
            seen += 1
    assert seen == 3 * len(users)


def test_the_partition_memo_keeps_repeat_shoppers_and_not_every_one_visit_shopper() -> None:
    """The load's mix: ~700 repeat shoppers and a new one-visit shopper in every tenth answer,
    25,000 of them (a 10-minute soak's worth). The memo must not keep them all (at 65,536 entries
    it grew through the whole soak) while the repeat shoppers, the ones it is for, keep being
    answered from it."""
    from libs.common.kafka import partition_of

    partition_of.cache_clear()
    regulars = [f"u_{n:032x}" for n in range(700)]
    rng = random.Random(7)
    regular_calls = regular_hits = 0
    for n in range(250_000):
        if n % 10 == 9:
            partition_of(f"u_new{n:029x}", 6)
            continue
        before = partition_of.cache_info().hits
        partition_of(rng.choice(regulars), 6)
        if n > 10_000:
            regular_calls += 1
            regular_hits += partition_of.cache_info().hits - before
    assert partition_of.cache_info().currsize < 10_000
    assert regular_hits / regular_calls > 0.99
    partition_of.cache_clear()
