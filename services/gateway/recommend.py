"""GetRecommendations: the concept paper's decision, made explicit and reported.

* a user whose style profile is confident (``confidence >= threshold`` and an
  anchor item) → STYLE_PERSONALIZED: CF candidates (plus popular items, which
  style may lift) re-ranked by ``(1-λ)·norm CF + λ·style affinity`` (catalog-centred cosine of profile and
  item style mapped to 0..1, see services/gateway/style.py),
  and the top items' photos drawn in the anchor item's style;
* a user with history → CF (the model's own order);
* anyone else → POPULAR.

Every part except the pseudonymization is optional: whatever is missing is
named in ``degraded_reason`` and the rest of the answer is still given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from stylerec.v1 import gateway_pb2

from libs.common import keys
from libs.common.pseudonym import Pseudonymizer
from services.gateway.answers import AnswerCache, Provenance
from services.gateway.candidates import CF, CandidateSet, CandidateSource, parse_recs, queue_recs
from services.gateway.catalog import ItemCatalog, ItemMeta
from services.gateway.config import GatewaySettings
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream
from services.gateway.embeddings import ItemEmbeddings, StyleCentroid, affinities
from services.gateway.experiments import ExperimentArm
from services.gateway.memo import ParseMemo
from services.gateway.metrics import RECOMMENDATIONS
from services.gateway.similar import EmbeddingIndex
from services.gateway.style import StyleProfile, normalize_cf, rerank_scored
from services.gateway.stylized import StylizedImages

# The common answer's whole Redis read as ONE command: profile, seen items, recs, their model
# version and the global one. A 5-command pipeline cost ~125 us of client CPU per answer in
# redis-py (packing and parsing each reply), the script ~70 us (docs/gateway.md, "Profile").
# KEYS = [style_profile, user_seen, recs, recs_meta, model_version, user_known]; recs_meta gives
# the model version and the listed items that are the user's own again (scoring's repeat_policy
# decay; absent otherwise); user_known says whether scoring holds state for the user at all
# (without it and without recs, scoring's TopN would only answer popularity). Like the stylize script,
# in Redis Cluster these keys would need a common hash tag; the embedded/compose Redis is one node.
USER_STATE_LUA = """
return {
  redis.call('HGETALL', KEYS[1]),
  redis.call('SMEMBERS', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('HMGET', KEYS[4], 'model_version', 'rebuy'),
  redis.call('GET', KEYS[5]),
  redis.call('EXISTS', KEYS[6]),
}
"""


def parse_rebuys(raw: bytes | None) -> frozenset[str]:
    """recs_meta's ``rebuy`` field (a JSON list of item ids); empty when absent or unreadable."""
    if not raw:
        return frozenset()
    try:
        items = json.loads(raw)
    except ValueError:
        return frozenset()
    return frozenset(str(i) for i in items) if isinstance(items, list) else frozenset()


def pairs(flat: list[Any]) -> dict[Any, Any]:
    """A Lua HGETALL reply (flat [field, value, ...]) as the dict redis-py's HGETALL gives."""
    it = iter(flat or [])
    return dict(zip(it, it, strict=True))


def copy_of(resp: gateway_pb2.GetRecommendationsResponse) -> gateway_pb2.GetRecommendationsResponse:
    out = gateway_pb2.GetRecommendationsResponse()
    out.CopyFrom(resp)
    return out


class UserState(NamedTuple):
    profile: StyleProfile | None
    seen: set[str]
    recs: tuple[list[tuple[str, float]], str] | None  # (items, model version); None: not read
    rebuys: frozenset[str]
    # Redis answered: no recs and no user_known marker, so scoring holds nothing for the user
    # and its TopN could only answer popularity (docs/contracts.md, user_known).
    unknown: bool = False


@dataclass
class Ranked:
    item_id: str
    cf_score: float
    style_affinity: float
    final: float


class Recommender:
    def __init__(
        self,
        settings: GatewaySettings,
        downstream: Downstream,
        pseudonymize: Pseudonymizer,
        catalog: ItemCatalog,
        candidates: CandidateSource,
        stylized: StylizedImages,
        embeddings: ItemEmbeddings,
        index: EmbeddingIndex | None = None,
        centroid: StyleCentroid | None = None,
        answers: AnswerCache | None = None,
    ) -> None:
        self.settings = settings
        self.ds = downstream
        self.pseudonymize = pseudonymize
        self.catalog = catalog
        self.candidates = candidates
        self.stylized = stylized
        self.embeddings = embeddings
        self.index = index
        self.centroid = centroid
        self.answers = answers if answers is not None and answers.enabled else None
        self._user_state = downstream.redis.register_script(USER_STATE_LUA)
        self._model_version_key = keys.model_version()
        self._profiles: ParseMemo[StyleProfile | None] = ParseMemo("style_profile", settings.parse_memo_entries)
        self._recs: ParseMemo[tuple[list[tuple[str, float]], str]] = ParseMemo("recs", settings.parse_memo_entries)
        # Labelled children looked up once, not per answer (.labels() hashes and locks).
        self._answers: dict[tuple[int, bool], Any] = {}

    def user_state(self, user: str, deadline: Deadline, deg: Degradation, with_recs: bool = False) -> UserState:
        """Style profile, seen items, (optionally) CF recs of a user, which of those recs are
        rebuys and whether scoring has never seen the user, in one Redis round trip."""

        def read(r: redis.Redis) -> list[Any]:
            if with_recs:
                names = [
                    keys.style_profile(user),
                    keys.user_seen(user),
                    keys.recs(user),
                    keys.recs_meta(user),
                    self._model_version_key,
                    keys.user_known(user),
                ]
                return list(self._user_state(names, []))
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(keys.style_profile(user))
            pipe.smembers(keys.user_seen(user))
            if with_recs:
                queue_recs(pipe, user)
            return pipe.execute()

        try:
            replies = self.ds.redis_call("user_state", read, deadline)
        except DependencyUnavailable as exc:
            deg.add(exc)
            return UserState(None, set(), None, frozenset())
        if with_recs:
            # Parsed once per distinct reply (content-addressed memo: a changed hash is a new key).
            raw_profile, raw_recs = replies[0] or [], replies[2] or []
            meta = replies[3] or [None, None]
            rv, raw_rebuy, gv = meta[0] or None, meta[1] or None, replies[4] or None
            profile = self._profiles.get(tuple(raw_profile), lambda: StyleProfile.from_redis(pairs(raw_profile)))
            recs = self._recs.get((tuple(raw_recs), rv, gv), lambda: parse_recs([pairs(raw_recs), rv, gv]))
            unknown = not recs[0] and not replies[5]
            return UserState(profile, {s.decode() for s in replies[1]}, recs, parse_rebuys(raw_rebuy), unknown)
        return UserState(StyleProfile.from_redis(replies[0]), {s.decode() for s in replies[1]}, None, frozenset())

    def recommend(
        self,
        request: gateway_pb2.GetRecommendationsRequest,
        deadline: Deadline,
        user: str = "",
        arm: ExperimentArm | None = None,
    ) -> gateway_pb2.GetRecommendationsResponse:
        """``user``: the pseudonym when the caller computed it already; ``arm``: the experiment
        arm's overrides (style path off, another λ), None = the configured behaviour.

        With kept answers on, the caller gets its own copy (it stamps the recommendation id on it)."""
        user = user or self.pseudonymize(request.user_id)
        if self.answers is None:
            return self._recommend(request, user, deadline, arm, Provenance())
        key = (user, request.SerializeToString(deterministic=True) + (arm.name.encode() if arm else b""))
        # Before the Redis read (and before the versions are checked): a change during the build is caught.
        token = self.answers.token(user)
        kept = self.answers.get(key, deadline)
        k = request.k or self.settings.default_k
        if kept is not None and kept.restyle:
            resp = self._restyle(kept.answer, user, deadline)
            built_from = Provenance(list(kept.depends), kept.volatile)
            self.answers.put(key, token, copy_of(resp), k, built_from, expires_at=kept.expires_at)
            self._count(resp)
            return resp
        if kept is not None:
            self._count(kept.answer)
            return copy_of(kept.answer)
        built_from = Provenance()
        resp = self._recommend(request, user, deadline, arm, built_from)
        self.answers.put(key, token, copy_of(resp), k, built_from)
        return resp

    def _restyle(
        self, kept: gateway_pb2.GetRecommendationsResponse, user: str, deadline: Deadline
    ) -> gateway_pb2.GetRecommendationsResponse:
        """A kept answer with its PENDING images asked again, the rest as built: what a rebuild
        would answer (the answer cache's invalidation covers everything but these states)."""
        resp = copy_of(kept)
        pending = [it for it in resp.items if it.stylized_status == gateway_pb2.STYLIZED_PENDING]
        deg = Degradation()
        metas = [ItemMeta(item_id=it.item_id, image_ref=it.image_ref) for it in pending]
        states = self.stylized.resolve(user, resp.anchor_item_id, metas, deadline, deg)
        for it in pending:
            st = states.get(it.item_id)
            if st is not None:
                it.stylized_status = gateway_pb2.StylizedStatus.ValueType(st.status)
                it.stylized_image_ref = st.ref
        resp.degraded = deg.degraded
        resp.degraded_reason = deg.reason()
        return resp

    def _recommend(
        self,
        request: gateway_pb2.GetRecommendationsRequest,
        user: str,
        deadline: Deadline,
        arm: ExperimentArm | None,
        built_from: Provenance,
    ) -> gateway_pb2.GetRecommendationsResponse:
        """``built_from`` learns the versioned inputs the answer used (services/gateway/answers.py)."""
        s = self.settings
        k = request.k or s.default_k
        f = request.filters
        style_on = arm is None or arm.style
        lam = s.style_lambda if arm is None or arm.style_lambda is None else arm.style_lambda
        deg = Degradation()
        profile, seen, recs, rebuys, unknown = self.user_state(user, deadline, deg, with_recs=True)
        pool = max(s.candidate_pool, k * 3)
        cands = self.candidates.for_user(
            user, pool, f.category, deadline, deg, prefetched=recs, unknown=unknown, built_from=built_from
        )
        # Rebuys count only in the list they were written with (not in a fallback's).
        rebuys = rebuys if cands.source == CF and recs is not None and cands.items else frozenset()
        # The user's own items stay out, except those scoring put back as rebuys.
        seen = seen - rebuys
        confident = style_on and profile is not None and profile.is_confident(s.style_confidence_threshold)
        resp = gateway_pb2.GetRecommendationsResponse(model_version=cands.model_version)
        if profile is not None:
            resp.anchor_item_id = profile.anchor
            resp.style_confidence = profile.confidence
        if confident and profile is not None:
            resp.strategy = gateway_pb2.STYLE_PERSONALIZED
            resp.style_lambda = lam
            ranked = self._style_ranked(profile, cands, seen, pool, f.category, deadline, deg, lam, built_from)
        else:
            resp.strategy = gateway_pb2.CF if cands.source == CF else gateway_pb2.POPULAR
            if cands.source != CF and seen:
                deg.add("cf: no candidates for a user with history; served popularity")
            ranked = self._cf_ranked(cands)
        excluded = set(f.exclude_item_ids) | seen
        if profile is not None:
            excluded.add(profile.anchor)
        chosen = self._filter(ranked, excluded, request, k, deadline, deg)
        if len(chosen) < k and resp.strategy != gateway_pb2.POPULAR and (f.category or f.min_price or f.max_price):
            # A narrow shelf (one category, a price band) can empty a personal list: top it up
            # from popularity in that category rather than answer short.
            have = excluded | {m.item_id for m, _ in chosen}
            extra = self._cf_ranked(self.candidates.popular(pool, f.category, deadline, deg, built_from))
            chosen += self._filter(extra, have, request, k - len(chosen), deadline, deg)
        states = {}
        if request.want_stylized and resp.strategy == gateway_pb2.STYLE_PERSONALIZED and profile is not None:
            # The first stylize_top_n items that have a photo get drawn; items without one are
            # reported UNAVAILABLE (nothing to draw), the rest NOT_REQUESTED.
            metas = [meta for meta, _ in chosen]
            drawable = [m for m in metas if m.image_ref and m.item_id != profile.anchor][: s.stylize_top_n]
            undrawable = [m for m in metas if not m.image_ref]
            states = self.stylized.resolve(user, profile.anchor, drawable + undrawable, deadline, deg)
        for meta, r in chosen:
            st = states.get(meta.item_id)
            resp.items.add(
                item_id=meta.item_id,
                title=meta.title,
                category=meta.category,
                price=meta.price,
                cf_score=r.cf_score,
                style_affinity=r.style_affinity,
                final_score=r.final,
                image_ref=meta.image_ref,
                stylized_status=st.status if st else gateway_pb2.STYLIZED_NOT_REQUESTED,
                stylized_image_ref=st.ref if st else "",
                rebuy=meta.item_id in rebuys,
            )
        resp.degraded = deg.degraded
        resp.degraded_reason = deg.reason()
        self._count(resp)
        return resp

    def _count(self, resp: gateway_pb2.GetRecommendationsResponse) -> None:
        counter = self._answers.get((resp.strategy, resp.degraded))
        if counter is None:
            counter = RECOMMENDATIONS.labels(gateway_pb2.Strategy.Name(resp.strategy), str(resp.degraded).lower())
            self._answers[(resp.strategy, resp.degraded)] = counter
        counter.inc()

    @staticmethod
    def _cf_ranked(cands: CandidateSet) -> list[Ranked]:
        norm = normalize_cf([sc for _, sc in cands.items])
        return [Ranked(i, n, 0.0, n) for (i, _), n in zip(cands.items, norm, strict=True)]

    def _style_ranked(
        self,
        profile: StyleProfile,
        cands: CandidateSet,
        seen: set[str],
        pool: int,
        category: str,
        deadline: Deadline,
        deg: Degradation,
        lam: float,
        built_from: Provenance,
    ) -> list[Ranked]:
        s = self.settings
        items = [(i, sc) for i, sc in cands.items if i not in seen]
        # Items the CF list lacks join at the bottom of the CF scale: popular ones, and the
        # catalog's closest looks to the profile. A strong style match can still lift them
        # (style as a recommendation signal, the paper's point); CF order decides the rest.
        extra: list[str] = []
        if cands.source == CF and s.style_popular_pool:
            popular = self.candidates.popular(s.style_popular_pool, category, deadline, deg, built_from)
            extra += [i for i, _ in popular.items]
        if self.index is not None:
            built_from.used(self.index, None, self.index.current_version)
        if self.index is None or s.embedding_cache_s <= 0:
            built_from.volatile = True  # per-item embeddings and the centroid, read without a version
        # With the embedding cache on, vectors come from the in-process index (one matrix product
        # gives the neighbour pool and the affinities); the per-item cache only for items it lacks.
        view = (
            self.index.for_profile(profile.vector, profile.centred, s.style_neighbour_pool, deadline, deg)
            if self.index is not None and s.embedding_cache_s > 0
            else None
        )
        if s.style_neighbour_pool and view is not None:
            extra += view.neighbours
        elif s.style_neighbour_pool and self.index is not None:
            extra += [
                i
                for i, _ in self.index.nearest(
                    profile.vector, s.style_neighbour_pool, deadline, deg, raw_query=not profile.centred
                )
            ]
        floor = min((sc for _, sc in items), default=0.0)
        present = {i for i, _ in items} | seen
        for i in extra:
            if i not in present:
                items.append((i, floor))
                present.add(i)
        items = items[: pool + s.style_popular_pool + s.style_neighbour_pool]
        ids = [i for i, _ in items]
        known: list[float | None] = []
        try:
            if view is not None:
                known, lacking = view.affinities(ids)
                if lacking:
                    built_from.volatile = True  # items the index lacks: their vectors are not versioned
                    vecs = self.embeddings.get_many([ids[n] for n in lacking], deadline)
                    for n, a in zip(lacking, affinities(profile.vector, vecs, view.centroid), strict=True):
                        known[n] = a
            else:
                # Scoring wrote the profile in the space of the centroid it published; score the
                # items in the same space (the uncentred one for a profile written without it).
                centroid = self.centroid.get(deadline, deg) if self.centroid is not None and profile.centred else None
                known = affinities(profile.vector, self.embeddings.get_many(ids, deadline), centroid)
        except DependencyUnavailable as exc:
            deg.add(exc)
        if not any(a is not None for a in known):
            # No candidate has a look yet (no photos, or not embedded yet): nothing is missing
            # from the answer, style simply has nothing to say, so CF order stands.
            return self._cf_ranked(CandidateSet(cands.source, items))
        rows = rerank_scored(items, known, lam)
        return [Ranked(i, c, a, fin) for i, c, a, fin in rows]

    def _filter(
        self,
        ranked: list[Ranked],
        excluded: set[str],
        request: gateway_pb2.GetRecommendationsRequest,
        k: int,
        deadline: Deadline,
        deg: Degradation,
    ) -> list[tuple[ItemMeta, Ranked]]:
        """Walk the ranking in batches, fetching metadata only for what may be shown."""
        f = request.filters
        needs_meta = bool(f.category or f.min_price > 0 or f.max_price > 0)
        todo = [r for r in ranked if r.item_id not in excluded]
        chosen: list[tuple[ItemMeta, Ranked]] = []
        batch = max(2 * k, 20)
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            metas = self.catalog.get_many([r.item_id for r in part], deadline, deg)
            for r in part:
                meta = metas.get(r.item_id)
                if meta is None or meta.partial:
                    if needs_meta:
                        continue  # cannot prove it passes the filter
                    meta = meta or ItemMeta(r.item_id)
                if f.category and meta.category != f.category:
                    continue
                if f.min_price > 0 and meta.price < f.min_price:
                    continue
                if f.max_price > 0 and meta.price > f.max_price:
                    continue
                chosen.append((meta, r))
                if len(chosen) >= k:
                    return chosen
            if deadline.expired():
                deg.add("deadline: ranking cut short")
                break
        return chosen
