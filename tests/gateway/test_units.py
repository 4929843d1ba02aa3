"""Pure parts of the gateway: the style blend, budgets and breakers."""

from __future__ import annotations

import time

import numpy as np
import pytest

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
