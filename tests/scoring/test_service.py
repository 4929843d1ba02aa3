"""Scoring replicas against the real broker, Redis and Mongo-protocol server."""

from __future__ import annotations

import hashlib
import time

import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from stylerec.v1 import common_pb2, scoring_pb2

from libs.common import keys
from libs.common.errors import violations_of
from libs.common.kafka import USER_EVENTS, dead_letter_topic, partition_of
from tests.scoring.conftest import ScoringEnv, cluster_events, topn, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seeded(scoring_env: ScoringEnv) -> ScoringEnv:
    scoring_env.archive(cluster_events(scoring_env.tag))
    scoring_env.start("scoring-a")
    return scoring_env


def user(env: ScoringEnv, name: str) -> str:
    return f"u_{env.tag}_{name}"


def item(env: ScoringEnv, name: str) -> str:
    return f"{env.tag}-{name}"


def test_start_rebuilds_state_from_archive_and_trains(seeded: ScoringEnv) -> None:
    stub = seeded.stub("scoring-a")
    info = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
    assert info.algorithm == "ease" and info.model_version.startswith("ease-")
    assert info.state_events == len(cluster_events(seeded.tag))
    assert seeded.db[f"models_{seeded.tag}"].find_one({"_id": info.model_version}) is not None
    # a0 holds A0, A1, A2 (A3 skipped by the pattern): A3 is the only unseen item of its cluster.
    r = topn(stub, user(seeded, "a0"), k=1)
    assert r.source == "personalized" and r.items[0].item_id == item(seeded, "A3")
    sim = stub.SimilarItems(scoring_pb2.SimilarItemsRequest(item_id=item(seeded, "B0"), k=3), timeout=10)
    assert {s.item_id for s in sim.items} == {item(seeded, f"B{i}") for i in (1, 2, 3)}


def test_restart_rebuilds_the_same_state(seeded: ScoringEnv) -> None:
    seeded.start("scoring-r", STYLEREC_CONSUMER_GROUP=f"scoring-r-{seeded.tag}")
    stub = seeded.stub("scoring-r")
    before = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
    recs_before = [i.item_id for i in topn(stub, user(seeded, "b1"), 4).items]
    seeded.stop("scoring-r")
    seeded.start("scoring-r", STYLEREC_CONSUMER_GROUP=f"scoring-r-{seeded.tag}")
    stub = seeded.stub("scoring-r")  # a new process on a new port
    after = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=10)
    assert after.state_events == before.state_events
    assert after.model_version == before.model_version  # loaded from the registry, not retrained
    assert [i.item_id for i in topn(stub, user(seeded, "b1"), 4).items] == recs_before
    seeded.stop("scoring-r")


def test_fold_in_rewrites_redis_recs(seeded: ScoringEnv) -> None:
    u = user(seeded, "a1")
    # Written at start-up: a replica rewrites the users of the partitions it is assigned.
    wait_for(lambda: seeded.redis.exists(keys.recs(u)), 20, what="recs written on partition assignment")
    before = {k.decode() for k in seeded.redis.hgetall(keys.recs(u))}
    stamp = seeded.redis.hget(keys.recs_meta(u), "updated_at")
    # a1 turns to cluster B: B items must enter the top-N without any retraining.
    for name in ("B0", "B1", "B2"):
        seeded.send(u, item(seeded, name))

    def changed() -> bool:
        recs = {k.decode() for k in seeded.redis.hgetall(keys.recs(u))}
        return item(seeded, "B3") in recs and recs != before

    wait_for(changed, 20, what="fold-in to change recs in Redis")
    assert seeded.redis.hget(keys.recs_meta(u), "updated_at") != stamp
    seen = {m.decode() for m in seeded.redis.smembers(keys.user_seen(u))}
    assert item(seeded, "B0") in seen
    # The gateway's "scoring knows this user" marker goes with the recs and outlives them.
    assert seeded.redis.get(keys.user_known(u)) == b"1"
    assert seeded.redis.ttl(keys.user_known(u)) > seeded.redis.ttl(keys.recs(u)) > 0


def test_two_replicas_split_the_partitions(seeded: ScoringEnv) -> None:
    seeded.start("scoring-b")
    a, b = seeded.stub("scoring-a"), seeded.stub("scoring-b")

    def split() -> tuple[set[int], set[int]] | None:
        pa = set(a.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).partitions)
        pb = set(b.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).partitions)
        if pa and pb and not pa & pb and pa | pb == set(range(6)):
            return pa, pb
        return None

    _, pb = wait_for(split, 60, every_s=0.5, what="rebalance")  # type: ignore[misc]
    # An event for a user on B's partitions is folded in by B, using state rebuilt from the archive.
    b_users = [n for n in range(12) if partition_of(user(seeded, f"b{n}")) in pb]
    assert b_users, "no seeded user hashes to replica B's partitions"
    n = b_users[0]
    u = user(seeded, f"b{n}")
    # b{n} bought every B item but B{(3 - n) % 4} (cluster_events). The event repeats one they
    # hold: the missing one must come back, and the archived ones must not (B's state has them).
    missing = item(seeded, f"B{(3 - n) % 4}")
    held = {item(seeded, f"B{i}") for i in range(4)} - {missing}
    seeded.redis.delete(keys.recs(u))
    seeded.send(u, sorted(held)[0], 1)
    wait_for(lambda: seeded.redis.exists(keys.recs(u)), 20, what="replica B to write recs")
    recs = {k.decode() for k in seeded.redis.hgetall(keys.recs(u))}
    assert missing in recs and not recs & held, recs


def test_malformed_message_goes_to_dead_letter_and_consumption_continues(seeded: ScoringEnv) -> None:
    garbage = b"\xff\xfe not a protobuf " + seeded.tag.encode()
    garbage_digest = hashlib.sha256(garbage).hexdigest()[:16]
    u = user(seeded, "dlq")
    seeded.producer.send_raw(USER_EVENTS, u.encode(), garbage).get(timeout=10)
    invalid = common_pb2.Event(event_id="", user_id=u, item_id="x", type=common_pb2.PURCHASE)
    seeded.producer.send_raw(USER_EVENTS, u.encode(), invalid.SerializeToString()).get(timeout=10)
    seeded.send(u, item(seeded, "A0"))
    wait_for(lambda: seeded.redis.exists(keys.recs(u)), 20, what="the valid event after the bad ones")

    consumer = KafkaConsumer(bootstrap_servers=[seeded.infra.kafka_bootstrap], group_id=None)
    tp = TopicPartition(dead_letter_topic("scoring"), 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    found: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(found) < 2:
        for records in consumer.poll(timeout_ms=500).values():
            for rec in records:
                dl = common_pb2.DeadLetter()
                dl.ParseFromString(rec.value)
                # user-events dead letters are redacted (libs/common/privacy.py): undecodable bytes
                # are withheld (named by size and SHA-256 prefix), a non-pseudonym key is dropped
                # and a user id not of the exact pseudonym form becomes "<redacted>".
                if dl.source_topic != USER_EVENTS:
                    continue
                if garbage_digest in dl.reason:
                    assert dl.value == b"" and dl.key == b""
                    found["garbage"] = dl.reason
                elif dl.value:
                    ev = common_pb2.Event.FromString(dl.value)
                    if ev.item_id == "x" and not ev.event_id and ev.user_id == "<redacted>":
                        found["invalid"] = dl.reason
    consumer.close()
    assert found.get("garbage", "").startswith("undecodable")
    assert found.get("invalid", "") == "invalid: event_id is required (user_id redacted)"


def test_train_rpc_publishes_and_replicas_hot_load(seeded: ScoringEnv) -> None:
    a, b = seeded.stub("scoring-a"), seeded.stub("scoring-b")
    resp = a.Train(scoring_pb2.TrainRequest(algorithm="itemknn", wait=True), timeout=60)
    assert resp.status == "published" and resp.model_version.startswith("itemknn-")
    assert resp.metrics["interactions"] > 0
    for stub in (a, b):
        wait_for(
            lambda s=stub: s.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).model_version == resp.model_version,
            20,
            what="hot load",
        )
    doc = seeded.db[f"models_{seeded.tag}"].find_one({"_id": resp.model_version})
    assert doc and doc["algorithm"] == "itemknn" and doc["artifact_ref"] and "data_watermark" in doc


def test_style_profile_written_for_gateway(seeded: ScoringEnv) -> None:
    u = user(seeded, "stylist")
    vecs = {}
    for n, name in enumerate(("A0", "A1")):
        v = np.zeros(100, dtype="<f4")
        v[n] = 1.0
        v[2] = 1.0
        v /= np.linalg.norm(v)
        vecs[name] = v
        seeded.redis.set(keys.item_embedding(item(seeded, name)), v.tobytes())
    # As the style worker does: earlier tests' batches may have found these items without one.
    seeded.redis.incr(keys.item_embeddings_version())
    seeded.send(u, item(seeded, "A0"), 5)
    seeded.send(u, item(seeded, "A1"), 1)
    seeded.send(u, item(seeded, "no-photo"), 5)
    wait_for(lambda: seeded.redis.exists(keys.style_profile(u)), 20, what="style profile")
    prof = seeded.redis.hgetall(keys.style_profile(u))
    vec = np.frombuffer(prof[b"vector"], dtype="<f4")
    assert vec.shape == (100,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4
    assert prof[b"anchor"].decode() == item(seeded, "A0")  # heaviest item with a photo
    assert 0.0 < float(prof[b"confidence"]) <= 1.0


def test_bad_requests_get_clear_errors(seeded: ScoringEnv) -> None:
    stub = seeded.stub("scoring-a")
    with pytest.raises(grpc.RpcError) as err:
        stub.TopN(scoring_pb2.TopNRequest(user_id="x", k=-1), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("k", "must be between 1 and 1000 (0 = default 10)") in violations_of(err.value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(scoring_pb2.ScoreRequest(user_id="", item_ids=[]), timeout=5)
    assert {f for f, _ in violations_of(err.value)} == {"user_id", "item_ids"}
    with pytest.raises(grpc.RpcError) as err:
        stub.Train(scoring_pb2.TrainRequest(algorithm="svd"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.SimilarItems(scoring_pb2.SimilarItemsRequest(item_id="never-seen", k=3), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    unknown = topn(stub, "u_nobody_at_all", 3)
    assert unknown.source == "popularity"
    scored = stub.Score(scoring_pb2.ScoreRequest(user_id=user(seeded, "a0"), item_ids=[item(seeded, "A3")]), timeout=5)
    assert scored.items[0].item_id == item(seeded, "A3")


def test_failed_training_publishes_nothing_and_serving_keeps_its_model(seeded: ScoringEnv) -> None:
    """In process against the real Mongo-protocol server: a fit that fails leaves the registry alone."""
    from services.scoring.config import ScoringSettings
    from services.scoring.registry import ModelRegistry
    from services.scoring.trainer import Trainer, TrainingError

    settings = ScoringSettings(
        events_collection=f"events_{seeded.tag}",
        models_collection=f"models_{seeded.tag}",
        algorithm_params='{"l2": -1e9}',  # not positive definite: the Cholesky factorisation fails
    )
    registry = ModelRegistry(seeded.db, settings.models_collection)
    before = [d["_id"] for d in registry.versions()]
    serving = seeded.stub("scoring-a").ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).model_version
    with pytest.raises(TrainingError):
        Trainer(settings, seeded.db, registry, None, None).train("ease", "rpc")
    too_few = ScoringSettings(events_collection=f"events_{seeded.tag}", min_train_events=10**6)
    with pytest.raises(TrainingError, match="archived events"):
        Trainer(too_few, seeded.db, registry, None, None).train("ease", "rpc")
    assert [d["_id"] for d in registry.versions()] == before
    assert seeded.stub("scoring-a").ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).model_version == serving


def test_registry_prunes_old_versions_and_their_artifacts(seeded: ScoringEnv) -> None:
    from bson import ObjectId

    from services.scoring.registry import ModelRegistry
    from services.scoring.trainer import fit_model
    from tests.scoring.test_state_and_foldin import events, state_of

    registry = ModelRegistry(seeded.db, f"models_prune_{seeded.tag}")
    published = []
    for n in range(3):
        sm = fit_model(state_of(events()), "popularity", {})
        sm.trained_at += n  # strictly increasing
        published.append((sm.version, registry.publish(sm)))
    assert registry.prune(keep=1) == [published[1][0], published[0][0]]
    assert [d["_id"] for d in registry.versions()] == [published[2][0]]
    assert not seeded.db["fs.files"].find_one({"_id": ObjectId(published[0][1])})
    loaded = registry.load(registry.latest() or {})
    assert loaded.version == published[2][0] and loaded.algorithm == "popularity"
