"""Rebuys on the real stack (issue 20): scoring replicas as processes on the session's broker,
Redis and Mongo-protocol server, and a real gateway reading what they write.

With ``STYLEREC_REPEAT_POLICY=off`` a shopper never gets their own items back; with ``decay``
the item they bought comes back in the gateway's answer marked ``rebuy``, a purchase folded in
live becomes a rebuy without retraining, the registry shows the learned blend, and after the
user is forgotten nothing of them remains in scoring's state or in Redis.

The forget command is produced on ``user-forget`` exactly as ingestion's ``ForgetUser``
announces it (services/ingestion/admin.py); the admin RPC itself is covered end to end by
tests/security/test_forget.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from stylerec.v1 import admin_pb2, gateway_pb2, scoring_pb2

from libs.common import keys
from libs.common.kafka import USER_FORGET, now_timestamp
from libs.common.privacy import UserRefs
from libs.common.pseudonym import Pseudonymizer
from tests.gateway.conftest import Gateway, start_gateway
from tests.scoring.conftest import SCORING_REDIS_DB, ScoringEnv, cluster_events, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
SECRET = "repeat-e2e-secret"
RAW_USER = "rebuy-shopper"


@pytest.fixture(scope="module")
def shop(scoring_env: ScoringEnv) -> Iterator[tuple[ScoringEnv, str]]:
    """The cluster shoppers of tests/scoring plus one real-id shopper who bought A0 three times."""
    env = scoring_env
    pseudonym = Pseudonymizer(SECRET)(RAW_USER)
    t0 = time.time() - 3600
    rows = cluster_events(env.tag, t0=t0)
    rows += [(f"{env.tag}-mine{n}", pseudonym, f"{env.tag}-A0", 5, t0 + 100 + n) for n in range(3)]
    rows += [(f"{env.tag}-mine-view", pseudonym, f"{env.tag}-A1", 1, t0 + 200)]
    env.archive(rows)
    yield env, pseudonym


def scoring_env_for(policy: str) -> dict[str, str]:
    return {"STYLEREC_PSEUDONYM_SECRET": SECRET, "STYLEREC_REPEAT_POLICY": policy}


def answer(gw: Gateway, k: int = 8) -> gateway_pb2.GetRecommendationsResponse:
    return gw.stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=RAW_USER, k=k), timeout=10)


def rebuy_field(env: ScoringEnv, user: str) -> Any:
    raw = env.redis.hget(keys.recs_meta(user), "rebuy")
    return None if raw is None else json.loads(raw)


def test_off_never_decay_marks_rebuys_and_forget_removes_all(shop: tuple[ScoringEnv, str]) -> None:
    env, user = shop
    a0, a1, b0 = (f"{env.tag}-{n}" for n in ("A0", "A1", "B0"))
    redis_url = f"redis://127.0.0.1:{env.infra.components['redis'].port}/{SCORING_REDIS_DB}"

    # --- off: seen items never come back, nothing is marked.
    env.start("scoring-rep-off", **scoring_env_for("off"))
    gw = start_gateway(
        env.infra,
        "gateway-repeat",
        {
            "STYLEREC_PSEUDONYM_SECRET": SECRET,
            "STYLEREC_REDIS_URL": redis_url,
        },
    )
    try:
        wait_for(lambda: env.redis.exists(keys.recs(user)), 30, what="recs of the shopper (off)")
        resp = answer(gw)
        ids = [r.item_id for r in resp.items]
        assert resp.strategy == gateway_pb2.CF and ids, resp
        assert a0 not in ids and a1 not in ids
        assert not any(r.rebuy for r in resp.items)
        assert rebuy_field(env, user) is None
        env.stop("scoring-rep-off")

        # --- decay: the same archive, a replica with the policy on. Its start-up rewrite of the
        # shopper's list puts A0 back, and the gateway marks it.
        env.start("scoring-rep-decay", **scoring_env_for("decay"))
        wait_for(lambda: a0 in (rebuy_field(env, user) or []), 30, what="A0 listed as a rebuy")
        resp = answer(gw)
        marks = {r.item_id: r.rebuy for r in resp.items}
        assert marks.get(a0) is True, resp
        assert all(not m for i, m in marks.items() if i not in (a0, a1)), marks

        # The blend learned at training time travels with the model and shows in the registry.
        stub = env.stub("scoring-rep-decay")
        trained = stub.Train(scoring_pb2.TrainRequest(wait=True), timeout=120)
        assert trained.status == "published", trained
        doc = env.db[f"models_{env.tag}"].find_one({"_id": trained.model_version})
        assert doc is not None and set(doc["repeat"]["weights"]) >= {"bias", "seen", "cf"}
        assert doc["repeat"]["learned_on"]
        wait_for(
            lambda: stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5).model_version == trained.model_version,
            20,
            what="the trained model hot-loaded",
        )
        info = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5)
        assert "repeat_weight.bias" in info.metrics and info.parameters["repeat_learned_on"]

        # Fold-in: a purchase of a never-bought item becomes a rebuy live, without retraining.
        env.send(user, b0)
        wait_for(lambda: b0 in (rebuy_field(env, user) or []), 30, what="B0 folded in as a rebuy")
        wait_for(lambda: any(r.item_id == b0 and r.rebuy for r in answer(gw).items), 20, what="B0 marked")

        # Forget: the command ingestion's ForgetUser publishes; every trace in scoring goes.
        ref = UserRefs(SECRET)(user)
        cmd = admin_pb2.ForgetCommand(user_ref=ref, requested_at=now_timestamp(), audit_id="a_repeat-e2e")
        env.producer.send_and_wait(USER_FORGET, ref, cmd)

        def gone() -> bool:
            info = stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=5)
            top = stub.TopN(scoring_pb2.TopNRequest(user_id=user, k=5, exclude_seen=False), timeout=5)
            return info is not None and top.source == "popularity" and not env.redis.exists(*keys.per_user(user))

        wait_for(gone, 30, what="the shopper forgotten by scoring")
        resp = answer(gw)
        assert resp.strategy == gateway_pb2.POPULAR and not any(r.rebuy for r in resp.items), resp
    finally:
        env.infra.stop_component("gateway-repeat")
        env.infra.components.pop("gateway-repeat", None)
        gw.channel.close()
