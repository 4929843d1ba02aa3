"""Catalog-centred style similarity: the shared math, scoring's profile, the published centroid."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import redis

from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.style_math import (
    MIN_CENTROID_ITEMS,
    affinities,
    catalog_centroid,
    centre,
    decode_centroid,
    encode_centroid,
    unit,
)
from services.scoring.style_profile import CatalogCentroid, compute_profile

# A Redis database no other test area uses: the centroid scans every embedding key in it.
CENTROID_REDIS_DB = 11


def catalog(per_style: int = 5) -> dict[str, np.ndarray]:
    """8-d looks sharing a large common component (3·e0) plus one distinct direction per style,
    like arbitrary_predict's embeddings (raw cosines of any two looks ~0.9)."""
    e = np.eye(8, dtype=np.float32)
    return {f"s{k}-{n}": 3.0 * e[0] + e[k + 1] for k in range(4) for n in range(per_style)}


def test_centre_is_unit_and_falls_back_to_plain_normalisation() -> None:
    v = np.array([3.0, 4.0, 0.0], dtype=np.float32)
    assert np.allclose(centre(v, None), [0.6, 0.8, 0.0])
    c = np.array([0.6, 0.0, 0.0], dtype=np.float32)
    out = centre(v, c)
    assert abs(float(np.linalg.norm(out)) - 1.0) < 1e-6
    assert np.allclose(out, [0.0, 1.0, 0.0])  # unit(v) - c = (0, 0.8, 0)
    # A look equal to the centroid has nothing distinctive: the zero vector (cosine 0), not NaN.
    assert np.allclose(centre(np.array([0.6, 0.8, 0.0]), np.array([0.6, 0.8, 0.0])), 0.0)
    rows = centre(np.stack([v, 2 * v]), c)
    assert rows.shape == (2, 3) and np.allclose(rows[0], rows[1])


def test_catalog_centroid_needs_enough_items_and_is_the_mean_unit_vector() -> None:
    few = np.ones((MIN_CENTROID_ITEMS - 1, 100), dtype=np.float32)
    assert catalog_centroid(few) == (None, MIN_CENTROID_ITEMS - 1)
    assert catalog_centroid(np.zeros((0, 100), dtype=np.float32)) == (None, 0)
    m = np.stack(list(catalog().values()))
    c, n = catalog_centroid(m)
    assert n == 20 and c is not None
    assert np.allclose(c, unit(m).mean(axis=0))
    back, items = decode_centroid(
        {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode_centroid(c, n, 1.0).items()},
        dim=8,
    )
    assert items == 20 and back is not None and np.allclose(back, c)
    assert decode_centroid({}) == (None, 0)
    assert decode_centroid({b"vector": b"\x00" * 12}) == (None, 0)


def test_affinities_centred_spread_over_0_1_and_plain_cosine_without_centroid() -> None:
    looks = catalog()
    m = np.stack(list(looks.values()))
    c, _ = catalog_centroid(m)
    raw = affinities(unit(m[0]), m, None)
    assert raw.min() > 0.85  # the common component: every look "matches" every other
    aff = affinities(centre(m[0], c), m, c)
    assert aff.min() >= 0.0 and aff.max() <= 1.0 + 1e-6
    assert aff[0] == pytest.approx(1.0) and aff.min() < 0.4  # own style 1, other styles far below


def test_compute_profile_centred_coherence_separates_mixed_from_consistent_taste() -> None:
    looks = catalog()
    c, _ = catalog_centroid(np.stack(list(looks.values())))
    mixed = {"s0-0": 10.0, "s1-0": 10.0, "s2-0": 10.0}  # three different styles
    consistent = {"s0-0": 10.0, "s0-1": 10.0, "s0-2": 10.0}
    half = 0.01  # evidence ~1: confidence = coherence

    plain_mixed = compute_profile(mixed, looks, half)
    centred_mixed = compute_profile(mixed, looks, half, c)
    centred_consistent = compute_profile(consistent, looks, half, c)
    assert plain_mixed is not None and centred_mixed is not None and centred_consistent is not None
    # Uncentred, the shared component makes a mixed taste look coherent ...
    assert plain_mixed.confidence > 0.95 and not plain_mixed.centred
    # ... centred, only consistently distinctive looks add up.
    assert centred_mixed.confidence < 0.4 and centred_mixed.centred
    assert centred_consistent.confidence > 0.99
    assert abs(float(np.linalg.norm(centred_mixed.vector)) - 1.0) < 1e-5
    # The profile points at the user's style in the centred space.
    assert float(centred_consistent.vector @ centre(looks["s0-4"], c)) > 0.99


def test_catalog_centroid_is_published_for_the_gateway_and_withdrawn_for_tiny_catalogs(infra: Stack) -> None:
    r = redis.Redis(port=infra.components["redis"].port, db=CENTROID_REDIS_DB)
    r.flushdb()
    try:
        looks = catalog()
        few = dict(list(looks.items())[: MIN_CENTROID_ITEMS - 1])
        r.mset({keys.item_embedding(i): unit(v).astype("<f4").tobytes() for i, v in few.items()})
        r.set(keys.item_embedding("broken"), b"\x00" * 7)  # wrong size: ignored
        r.incr(keys.item_embeddings_version())  # as every embedding writer does
        cc = CatalogCentroid(r, 8, refresh_s=300.0, retry_s=0.0)
        assert cc.get() is None and cc.items == MIN_CENTROID_ITEMS - 1
        assert not r.exists(keys.style_centroid())

        r.mset({keys.item_embedding(i): unit(v).astype("<f4").tobytes() for i, v in looks.items()})
        r.incr(keys.item_embeddings_version())
        c = cc.get()
        expected, n = catalog_centroid(np.stack(list(looks.values())))
        assert c is not None and expected is not None and n == 20 and np.allclose(c, expected, atol=1e-6)
        h = r.hgetall(keys.style_centroid())
        assert int(h[b"items"]) == 20 and np.allclose(np.frombuffer(h[b"vector"], "<f4"), expected, atol=1e-6)
        assert 0 < r.ttl(keys.style_centroid()) <= 3600
    finally:
        r.flushdb()
        r.close()


def test_started_centroid_refreshes_on_its_own_thread_not_in_get(infra: Stack) -> None:
    """Once started (as the service does), ``get`` never scans Redis: the consumer's profile write
    reads the last value while the ``style-centroid`` thread retries and refreshes."""
    r = redis.Redis(port=infra.components["redis"].port, db=CENTROID_REDIS_DB)
    r.flushdb()
    cc = CatalogCentroid(r, 8, refresh_s=300.0, retry_s=0.2)
    try:
        cc.start()  # nothing embedded: no centroid, retried every 0.2 s in the background
        assert cc.get() is None
        looks = catalog()
        r.mset({keys.item_embedding(i): unit(v).astype("<f4").tobytes() for i, v in looks.items()})
        r.incr(keys.item_embeddings_version())
        deadline = time.monotonic() + 10
        while cc.get() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cc.get() is not None and cc.items == 20
        r.flushdb()  # a due refresh would now withdraw it; get() must not run one (next in 300 s)
        assert cc.get() is not None
    finally:
        cc.stop()
        r.flushdb()
        r.close()


def test_a_retry_scans_only_when_the_embeddings_version_moved(infra: Stack) -> None:
    """No centroid yet (too few embedded items): each retry reads the version; the SCAN, which
    walks every user's keys too, runs again only when an embedding was written or deleted."""
    r = redis.Redis(port=infra.components["redis"].port, db=CENTROID_REDIS_DB)
    r.flushdb()
    scans: list[int] = []
    real_scan = r.scan_iter

    def counted(*args: Any, **kwargs: Any) -> Any:
        scans.append(1)
        return real_scan(*args, **kwargs)

    r.scan_iter = counted  # type: ignore[method-assign]
    try:
        cc = CatalogCentroid(r, 8, refresh_s=300.0, retry_s=0.0)
        for _ in range(5):
            assert cc.get() is None
        assert len(scans) == 1, "retries with nothing written must not rescan"
        looks = catalog()
        r.mset({keys.item_embedding(i): unit(v).astype("<f4").tobytes() for i, v in looks.items()})
        assert cc.get() is None, "a write that did not move the version is not looked for"
        r.incr(keys.item_embeddings_version())
        assert cc.get() is not None and cc.items == 20
        assert len(scans) == 2
    finally:
        r.flushdb()
        r.close()
