"""Experiment arms and impressions through a real gateway process: the arm changes the answer
as configured, the answer carries its recommendation id and arm, and the impression on the real
broker names the pseudonym (never the raw id), the strategy, the arm and the items in order."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer
from stylerec.v1 import common_pb2, gateway_pb2

from cli.localstack.stack import Stack
from libs.common.kafka import ensure_topics, partition_of
from services.gateway.config import ExperimentArm
from services.gateway.experiments import Experiments
from tests.gateway.conftest import Gateway, Seeder, basis, pseudo

pytestmark = pytest.mark.integration

ARMS = [{"name": "cf", "style": False}, {"name": "style", "style_lambda": 0.5}]


def impressions_on(
    infra: Stack, topic: str, want: int, wait_s: float = 20
) -> list[tuple[bytes, int, common_pb2.Impression]]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=[infra.kafka_bootstrap], group_id=None, auto_offset_reset="earliest"
    )
    out: list[tuple[bytes, int, common_pb2.Impression]] = []
    end = time.monotonic() + wait_s
    try:
        while time.monotonic() < end and len(out) < want:
            for batch in consumer.poll(timeout_ms=300).values():
                for rec in batch:
                    batch = common_pb2.ImpressionBatch.FromString(rec.value).impressions
                    out += [(rec.key, rec.partition, imp) for imp in batch]
    finally:
        consumer.close()
    return out


def test_arms_change_the_answer_and_every_answer_becomes_an_impression(
    infra: Stack, gateway_factory: Callable[..., Gateway], mongo: object, unique: str
) -> None:
    topic = f"imp-gw-{unique}"
    # 4 partitions, not the default layout's 6: the gateway must group by the topic's own count.
    ensure_topics([infra.kafka_bootstrap], {topic: 4})
    name, salt = f"exp-{unique}", f"salt-{unique}"
    gw = gateway_factory(
        f"gw-exp-{unique}",
        {
            "STYLEREC_EXPERIMENT_NAME": name,
            "STYLEREC_EXPERIMENT_SALT": salt,
            "STYLEREC_EXPERIMENT_ARMS": json.dumps(ARMS),
            "STYLEREC_IMPRESSIONS_TOPIC": topic,
        },
    )
    seed = Seeder(gw.redis, mongo)
    ids = [f"ex-{unique}-{i}" for i in range(4)]
    for n, i in enumerate(ids):
        seed.item(i, embedding=basis(n))
    # Users with a confident profile, one per arm (the split is the documented keyed hash).
    split = Experiments(name, salt, tuple(ExperimentArm(**a) for a in ARMS))  # type: ignore[arg-type]
    by_arm: dict[str, str] = {}
    n = 0
    while len(by_arm) < 2:
        raw = f"shopper-{unique}-{n}"
        by_arm.setdefault(split.assign(pseudo(raw)).arm_name, raw)
        n += 1
    for raw in by_arm.values():
        u = pseudo(raw)
        seed.recs(u, {ids[0]: 0.9, ids[1]: 0.8, ids[2]: 0.7, ids[3]: 0.1}, version="m-1")
        seed.profile(u, basis(3), confidence=0.9, anchor=ids[3])

    answers = {}
    for arm, raw in by_arm.items():
        first = gw.stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=raw, k=3), timeout=5)
        again = gw.stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=raw, k=3), timeout=5)
        assert (first.experiment, first.experiment_arm) == (name, arm) == (again.experiment, again.experiment_arm)
        assert re.fullmatch(r"rec_[0-9a-f]{32}", first.recommendation_id)
        assert first.recommendation_id != again.recommendation_id
        answers[arm] = first
    # Style path off: the confident user is served CF; on: the style path with the arm's λ.
    assert answers["cf"].strategy == gateway_pb2.CF and answers["cf"].style_lambda == 0
    assert answers["style"].strategy == gateway_pb2.STYLE_PERSONALIZED
    assert answers["style"].style_lambda == pytest.approx(0.5)

    got = impressions_on(infra, topic, want=4)
    assert len(got) == 4
    by_id = {imp.recommendation_id: (key, partition, imp) for key, partition, imp in got}
    for arm, resp in answers.items():
        key, partition, imp = by_id[resp.recommendation_id]
        user = pseudo(by_arm[arm])
        # A record holds the impressions of users sharing a partition, keyed by one of them.
        assert (
            key.decode() in {pseudo(raw) for raw in by_arm.values()}
            and partition_of(key.decode(), 4) == partition_of(user, 4) == partition
            and imp.user_id == user
            and by_arm[arm] not in imp.SerializeToString().decode(errors="replace")
        )
        assert (imp.experiment, imp.arm, imp.model_version) == (name, arm, "m-1")
        assert imp.strategy == gateway_pb2.Strategy.Name(resp.strategy)
        assert [(i.item_id, i.position) for i in imp.items] == [(r.item_id, n) for n, r in enumerate(resp.items)]
        assert abs(imp.shown_at.seconds - time.time()) < 60


def test_without_arms_answers_carry_an_id_but_no_arm(gateway: Gateway, seed: Seeder) -> None:
    user = f"plain-{uuid.uuid4().hex[:8]}"
    resp = gateway.stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=user, k=3), timeout=5)
    assert resp.recommendation_id.startswith("rec_") and resp.experiment == "" and resp.experiment_arm == ""
