"""A large seen set is asked about the answer's candidates instead of read whole
(services/gateway/seen.py): the answers must be exactly those of the whole-set read.

Two real gateways over the same seeded stores: the shared one reads every seen set whole (the
default bound is far above these sets), the other has ``STYLEREC_SEEN_READ_MAX=0`` and so asks
Redis (SMISMEMBER) for every shopper with history. The paths that filter by the seen set: the
popularity fallback of a shopper with history, the style path's extras (popular items and the
catalog's closest looks) and a narrow shelf's category top-up.
"""

from __future__ import annotations

from typing import Any

import pytest
from stylerec.v1 import gateway_pb2

from tests.gateway.conftest import Gateway, Seeder, basis, png_bytes, pseudo

pytestmark = pytest.mark.integration


def both(whole: Gateway, asking: Gateway, user: str, **kw: Any) -> gateway_pb2.GetRecommendationsResponse:
    req = gateway_pb2.GetRecommendationsRequest(user_id=user, **kw)
    a = whole.stub.GetRecommendations(req, timeout=5)
    b = asking.stub.GetRecommendations(req, timeout=5)
    assert [(r.item_id, round(r.final_score, 6)) for r in b.items] == [
        (r.item_id, round(r.final_score, 6)) for r in a.items
    ]
    assert (b.strategy, b.degraded, b.degraded_reason) == (a.strategy, a.degraded, a.degraded_reason)
    return a


def test_asked_seen_set_gives_the_whole_set_answer(
    gateway: Gateway, gateway_factory: Any, seed: Seeder, unique: str
) -> None:
    asking = gateway_factory(f"seen-ask-{unique}", {"STYLEREC_SEEN_READ_MAX": "0"})

    # Popularity fallback for a shopper with history but no recs: their seen popular items stay out.
    pop = [f"sp-{unique}-{i}" for i in range(8)]
    for i in pop:
        seed.item(i)
    seed.popular({i: 1000.0 - n for n, i in enumerate(pop)})
    fallback = f"seen-fallback-{unique}"
    seed.seen(pseudo(fallback), [pop[0], pop[2], pop[5]])
    resp = both(gateway, asking, fallback, k=8)
    shown = [r.item_id for r in resp.items]
    assert resp.strategy == gateway_pb2.POPULAR
    assert pop[1] in shown and not {pop[0], pop[2], pop[5]} & set(shown)

    # Style path: CF list plus popular extras plus the closest looks; seen ones (and the anchor) stay out.
    stylish = f"seen-style-{unique}"
    anchor = f"sanchor-{unique}"
    seed.item(anchor, photo=png_bytes((20, 30, 200)), embedding=basis(0))
    looks = [f"slook-{unique}-{i}" for i in range(4)]
    for n, i in enumerate(looks):
        seed.item(i, photo=png_bytes((10, 200, 10 + n)), embedding=basis(0, mix=0.2 + 0.1 * n))
    seed.recs(pseudo(stylish), {looks[0]: 0.9, looks[1]: 0.5})
    seed.seen(pseudo(stylish), [anchor, looks[2], pop[1]])
    seed.profile(pseudo(stylish), basis(0), confidence=0.9, anchor=anchor)
    resp = both(gateway, asking, stylish, k=20)
    shown = [r.item_id for r in resp.items]
    assert resp.strategy == gateway_pb2.STYLE_PERSONALIZED
    assert looks[0] in shown and not {anchor, looks[2], pop[1]} & set(shown)

    # Narrow shelf topped up from its category's popularity: a seen item of it stays out.
    shelf = f"seen-shelf-{unique}"
    cat = f"scat-{unique}"
    gifts = [f"sg-{unique}-{i}" for i in range(2)]
    for i in gifts:
        seed.item(i, category="gift")
    photos = [f"sph-{unique}-{i}" for i in range(4)]
    for i in photos:
        seed.item(i, category=cat)
    seed.recs(pseudo(shelf), {i: 1.0 for i in gifts})
    seed.popular({p: 10.0 - n for n, p in enumerate(photos)}, category=cat)
    seed.seen(pseudo(shelf), [photos[0]])
    resp = both(gateway, asking, shelf, k=2, filters=gateway_pb2.Filters(category=cat))
    assert [r.item_id for r in resp.items] == photos[1:3]
