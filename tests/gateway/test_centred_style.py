"""The gateway's side of catalog-centred style similarity (pure parts)."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.style_math import catalog_centroid, centre
from services.gateway.embeddings import affinities
from services.gateway.style import StyleProfile, encode_embedding, rerank


def looks() -> dict[str, np.ndarray]:
    e = np.eye(100, dtype=np.float32)
    return {f"s{k}-{n}": (3.0 * e[0] + e[k + 1]) / np.sqrt(10.0) for k in range(4) for n in range(5)}


def test_profile_hash_says_whether_it_is_centred() -> None:
    base = {b"vector": encode_embedding(np.ones(100)), b"confidence": b"0.7", b"anchor": b"a"}
    old = StyleProfile.from_redis(base)
    new = StyleProfile.from_redis({**base, b"centred": b"1"})
    assert old is not None and not old.centred
    assert new is not None and new.centred


def test_centred_rerank_tells_looks_apart_where_plain_cosine_cannot() -> None:
    emb = looks()
    c, _ = catalog_centroid(np.stack(list(emb.values())))
    assert c is not None
    cands = [("s1-0", 2.0), ("s0-0", 1.0)]
    plain = {r[0]: r[2] for r in rerank(cands, emb["s0-1"], emb, 0.5)}
    assert abs(plain["s0-0"] - plain["s1-0"]) < 0.15  # ~0.9 vs 1.0: nearly flat
    rows = rerank(cands, centre(emb["s0-1"], c), emb, 0.5, c)
    by_id = {r[0]: r for r in rows}
    assert by_id["s0-0"][2] == pytest.approx(1.0)
    assert by_id["s1-0"][2] < 0.4
    assert min(r[2] for r in rows) >= 0.0 and max(r[3] for r in rows) <= 1.0 + 1e-6


def test_gateway_affinities_match_the_shared_math_and_keep_missing_as_none() -> None:
    emb = looks()
    c, _ = catalog_centroid(np.stack(list(emb.values())))
    p = centre(emb["s2-0"], c)
    out = affinities(p, [emb["s2-1"], None, emb["s3-0"]], c)
    assert out[1] is None and out[0] == pytest.approx(1.0) and out[2] is not None and out[2] < 0.4
    plain = affinities(emb["s2-0"], [emb["s2-1"], emb["s3-0"]])
    assert plain[0] == pytest.approx(1.0) and plain[1] == pytest.approx(0.9, abs=0.01)
