"""`stylerec experiment online`: proof on SIMULATED shoppers that the experiment pipeline finds a
real difference and does not invent one.

Everything between the shopper and the report is the real stack: the broker, Redis and the
Mongo-protocol server, one ingestion process (API, event archive, impression archive and
attribution) and two gateway processes, each running one experiment:

* ``planted``: arm ``control`` has the style path off (CF order), arm ``style`` has it on;
* ``aa``: arms ``a`` and ``b`` are configured identically (an A/A test).

What is synthetic, and labelled so in every output: the catalog (items in a few style clusters,
their style embeddings), the users' CF recommendations and style profiles (written to the stores
exactly as scoring and the style worker write them, docs/contracts.md), and the shoppers. A
shopper clicks a shown item with a probability that falls with its position and is
``match_boost`` times higher when the item is in the shopper's own style cluster; a click turns
into a cart and then a purchase with fixed probabilities. So the style arm should win only
because it shows more matching items — the planted lift — and the A/A arms should not differ.
Half of the outcome events carry the answer's recommendation id, half are attributed by user,
item and time window; both go through IngestEvents as a shop would send them.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from pymongo import MongoClient
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.evaluation.experiment_report import build_report
from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.kafka import ensure_topics
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET
from services.gateway.style import encode_embedding

SYNTHETIC = "SYNTHETIC SIMULATION: generated catalog, seeded model outputs and simulated shoppers, not real users"
# The public dev pseudonym key (libs/common/settings.py): simulated shoppers on a throw-away stack.
SECRET = DEV_PSEUDONYM_SECRET
EXPERIMENTS: dict[str, list[dict[str, Any]]] = {
    "planted": [{"name": "control", "style": False}, {"name": "style", "style_lambda": 0.5}],
    "aa": [{"name": "a"}, {"name": "b"}],
}
K = 10


@dataclass(frozen=True)
class Shoppers:
    """How simulated shoppers react to a list (the planted effect is ``match_boost``)."""

    base_click: float = 0.03
    match_boost: float = 4.0
    position_decay: float = 0.1
    cart_given_click: float = 0.5
    purchase_given_cart: float = 0.6

    def click_probability(self, position: int, matches: bool) -> float:
        p = self.base_click / (1 + self.position_decay * position)
        return min(1.0, p * (self.match_boost if matches else 1.0))


@dataclass
class Planted:
    """What the simulator did: the outcomes attribution must find, per experiment."""

    impressions: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, set[tuple[str, str, str]]] = field(default_factory=dict)
    events: list[common_pb2.Event] = field(default_factory=list)
    window_matched: set[tuple[str, str, str]] = field(default_factory=set)  # sent without the answer's id


@dataclass
class World:
    items: list[str]
    cluster_of: dict[str, int]
    users: dict[str, list[tuple[str, int]]]  # experiment -> [(raw user id, style cluster)]


def seed_world(
    r: redis.Redis, db: Any, token: str, users_per_experiment: int, rng: np.random.Generator, clusters: int = 5
) -> World:
    """Catalog, embeddings, popularity, CF recs and confident style profiles (all synthetic)."""
    n_items = 40 * clusters
    centres = rng.normal(size=(clusters, 100)).astype(np.float32)
    items = [f"sim-{token}-{n}" for n in range(n_items)]
    cluster_of = {i: n % clusters for n, i in enumerate(items)}
    emb = {i: centres[cluster_of[i]] + 0.35 * rng.normal(size=100).astype(np.float32) for i in items}
    db["items"].insert_many(
        [
            {"_id": i, "title": f"Synthetic item {n}", "category": "sim", "brand": "sim", "price": 10.0 + n % 7}
            for n, i in enumerate(items)
        ]
    )
    pipe = r.pipeline(transaction=False)
    for i in items:
        pipe.set(keys.item_embedding(i), encode_embedding(emb[i]))
    pipe.incr(keys.item_embeddings_version())  # as the style worker does: readers rescan when it moves
    pipe.zadd(keys.popular(), {i: float(n_items - n) for n, i in enumerate(items[:50])})
    pipe.set(keys.model_version(), "sim-model-1")
    pseudo = Pseudonymizer(SECRET)
    users: dict[str, list[tuple[str, int]]] = {}
    for name in EXPERIMENTS:
        users[name] = []
        for u in range(users_per_experiment):
            # Not per run: the same seed gives the same users, so the same split and the same reactions.
            raw = f"sim-shopper-{name}-{u}"
            user, style = pseudo(raw), int(rng.integers(clusters))
            picks = rng.choice(n_items, size=60, replace=False)
            # Replaced, not added to: a rerun on the same Redis database must not keep the last
            # run's items (not in this catalog) in the lists.
            pipe.delete(keys.recs(user))
            pipe.hset(keys.recs(user), mapping={items[p]: float(rng.random()) for p in picks})
            pipe.hset(keys.recs_meta(user), mapping={"model_version": "sim-model-1", "updated_at": "0"})
            own = [i for i in items if cluster_of[i] == style]
            anchor = own[int(rng.integers(len(own)))]
            pipe.hset(
                keys.style_profile(user),
                mapping={"vector": encode_embedding(centres[style]), "confidence": "0.9", "anchor": anchor},
            )
            users[name].append((raw, style))
    pipe.execute()
    return World(items, cluster_of, users)


def shop(
    gateways: dict[str, str],
    world: World,
    shoppers: Shoppers,
    requests_per_user: int,
    seed: int,
    progress: Callable[[str], None],
) -> Planted:
    """Every simulated user asks for recommendations and reacts; the outcome events are collected."""
    import grpc

    planted = Planted()
    collected: list[tuple[str, common_pb2.Event | None, tuple[str, str, str] | None]] = []

    def one_user(exp: str, n: int, raw: str, style: int) -> list[tuple[str, common_pb2.Event | None, Any]]:
        rng = np.random.default_rng([seed, n, len(exp)])
        out: list[tuple[str, common_pb2.Event | None, Any]] = []
        with grpc.insecure_channel(gateways[exp]) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            for _ in range(requests_per_user):
                resp = stub.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=raw, k=K), timeout=10)
                out.append((exp, None, None))  # one impression
                for pos, it in enumerate(resp.items):
                    matches = world.cluster_of.get(it.item_id) == style
                    if rng.random() >= shoppers.click_probability(pos, matches):
                        continue
                    chain = [(common_pb2.CLICK, "click")]
                    if rng.random() < shoppers.cart_given_click:
                        chain.append((common_pb2.ADD_TO_CART, "cart"))
                        if rng.random() < shoppers.purchase_given_cart:
                            chain.append((common_pb2.PURCHASE, "purchase"))
                    with_id = rng.random() < 0.5
                    for etype, outcome in chain:
                        e = common_pb2.Event(
                            event_id=f"{resp.recommendation_id}-{it.item_id}-{outcome}",
                            user_id=raw,
                            item_id=it.item_id,
                            type=etype,
                            recommendation_id=resp.recommendation_id if with_id else "",
                        )
                        e.timestamp.FromNanoseconds(time.time_ns())
                        out.append((exp, e, (resp.recommendation_id, it.item_id, outcome)))
        return out

    jobs = [(exp, n, raw, style) for exp, us in world.users.items() for n, (raw, style) in enumerate(us)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for done, rows in enumerate(pool.map(lambda j: one_user(*j), jobs), 1):
            collected.extend(rows)
            if done % 100 == 0 or done == len(jobs):
                progress(f"  shoppers done: {done}/{len(jobs)}")
    for exp, e, key in collected:
        if e is None:
            planted.impressions[exp] = planted.impressions.get(exp, 0) + 1
        elif key is not None:
            planted.events.append(e)
            planted.outcomes.setdefault(exp, set()).add(key)
            if not e.recommendation_id:
                planted.window_matched.add(key)
    return planted


def send_outcomes(ingestion: str, planted: Planted) -> None:
    """The outcome events through IngestEvents, as a shop sends them; every one must be accepted."""
    import grpc

    with grpc.insecure_channel(ingestion) as ch:
        stub = ingestion_pb2_grpc.IngestionServiceStub(ch)
        for start in range(0, len(planted.events), 500):
            chunk = planted.events[start : start + 500]
            resp = stub.IngestEvents(ingestion_pb2.IngestEventsRequest(events=chunk), timeout=60)
            if resp.rejected:
                raise RuntimeError(f"ingestion rejected simulated events: {resp.rejected[0].reason}")
            if resp.accepted != len(chunk):
                raise RuntimeError(f"ingestion accepted {resp.accepted} of {len(chunk)} simulated events")


def wait_impressions(db: Any, names: dict[str, str], planted: Planted, timeout_s: float) -> None:
    """Until every impression is archived. The simulated shop sends its outcome events only then:
    it sends them all at once after the shopping, so they are past the clock skew +
    ``attribution_settle_s`` when they arrive, and an impression still in flight would let a window
    match take the shopper's other list (last touch is only as right as the impression archive is
    complete; docs/experiments.md)."""
    want = sum(planted.impressions.values())
    deadline = time.monotonic() + timeout_s
    while db[names["impressions"]].count_documents({}) < want and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_attributed(
    db: Any, names: dict[str, str], planted: Planted, timeout_s: float, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Until every impression is archived and every planted outcome attributed (or the timeout)."""
    want_imp = sum(planted.impressions.values())
    want_att = sum(len(v) for v in planted.outcomes.values())
    t0 = time.monotonic()
    shown_at = t0
    while True:
        imp = db[names["impressions"]].count_documents({})
        att = db[names["attributions"]].count_documents({})
        if (imp >= want_imp and att >= want_att) or time.monotonic() - t0 > timeout_s:
            break
        if time.monotonic() - shown_at >= 10:
            shown_at = time.monotonic()
            parked = db[names["pending"]].count_documents({})
            progress(
                f"  after {shown_at - t0:.0f} s: impressions {imp}/{want_imp}, attributed {att}/{want_att}, "
                f"parked {parked}"
            )
        time.sleep(0.5)
    rows = list(db[names["attributions"]].find({}))
    found = {(d["recommendation_id"], d["item_id"], d["outcome"]) for d in rows}
    want = set().union(*planted.outcomes.values()) if planted.outcomes else set()
    # A few of the rows attribution got wrong, to start a diagnosis from (none expected).
    extra = [
        {k: d.get(k) for k in ("recommendation_id", "item_id", "outcome", "event_id", "matched_by")}
        for d in rows
        if (d["recommendation_id"], d["item_id"], d["outcome"]) not in want
    ][:5]
    # Which planted outcomes are missing, by how they must be matched: a diagnosis starts here.
    missing: dict[str, int] = {}
    for key in want - found:
        how = "window" if key in planted.window_matched else "id"
        missing[how] = missing.get(how, 0) + 1
    return {
        "impressions_sent": want_imp,
        "impressions_archived": imp,
        "outcomes_planted": want_att,
        "outcomes_attributed": len(found),
        "attributed_as_planted": len(found & want),
        "attributed_not_planted": len(found - want),
        "missing_by_match": missing,
        "examples_not_planted": extra,
    }


def run_online(
    users_per_experiment: int = 400,
    requests_per_user: int = 2,
    seed: int = 7,
    stack: Stack | None = None,
    redis_db: int = 0,
    shoppers: Shoppers | None = None,
    progress: Callable[[str], None] = print,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Start what is missing, simulate, attribute, report. ``stack``: running infra to reuse (the tests
    pass the session's; topics, collections, groups and a Redis database are then this run's own)."""
    t0 = time.monotonic()
    shoppers = shoppers or Shoppers()
    token = uuid.uuid4().hex[:8]
    own = stack is None
    tmp = tempfile.TemporaryDirectory(prefix="stylerec-experiment-online-") if own else None
    stack = stack or Stack(dir=Path(tmp.name))  # type: ignore[union-attr]
    started: list[str] = []
    names = {
        "impressions": f"impressions_{token}",
        "attributions": f"attributions_{token}",
        "pending": f"attribution_pending_{token}",
    }
    events_topic, impressions_topic = f"sim-events-{token}", f"sim-impressions-{token}"
    try:
        if own:
            progress("starting broker, Redis and the Mongo-protocol server ...")
            stack.start_infra()
        ensure_topics([stack.kafka_bootstrap], {events_topic: 3, impressions_topic: 3})
        redis_url = f"redis://{stack.components['redis'].address}/{redis_db}"
        common = {"STYLEREC_PSEUDONYM_SECRET": SECRET, "STYLEREC_REDIS_URL": redis_url, "STYLEREC_LOG_LEVEL": "WARNING"}
        ing_name = f"ingestion-sim-{token}"
        stack.start_service(
            "ingestion",
            instance=ing_name,
            extra_env={
                **common,
                "STYLEREC_EVENTS_TOPIC": events_topic,
                "STYLEREC_EVENTS_COLLECTION": f"events_sim_{token}",
                "STYLEREC_ARCHIVER_GROUP": f"archiver-sim-{token}",
                "STYLEREC_IMPRESSIONS_TOPIC": impressions_topic,
                "STYLEREC_IMPRESSIONS_GROUP": f"impressions-sim-{token}",
                "STYLEREC_ATTRIBUTION_GROUP": f"attribution-sim-{token}",
                "STYLEREC_IMPRESSIONS_COLLECTION": names["impressions"],
                "STYLEREC_ATTRIBUTIONS_COLLECTION": names["attributions"],
                "STYLEREC_ATTRIBUTION_PENDING_COLLECTION": names["pending"],
                "STYLEREC_ATTRIBUTION_WINDOW_S": "3600",
                "STYLEREC_ATTRIBUTION_SETTLE_S": "2",
                # One machine's clock: window matches are decided skew + settle = 4 s after the event.
                "STYLEREC_ATTRIBUTION_CLOCK_SKEW_S": "2",
            },
        )
        started.append(ing_name)
        gateways = {}
        for exp, arms in EXPERIMENTS.items():
            gw_name = f"gateway-sim-{exp}-{token}"
            comp = stack.start_service(
                "gateway",
                instance=gw_name,
                extra_env={
                    **common,
                    "STYLEREC_SCORING_ADDR": "",
                    "STYLEREC_ITEM_UPDATES_GROUP": f"gateway-item-cache-{gw_name}",
                    "STYLEREC_EXPERIMENT_NAME": exp,
                    "STYLEREC_EXPERIMENT_SALT": f"{exp}-{seed}",
                    "STYLEREC_EXPERIMENT_ARMS": json.dumps(arms),
                    "STYLEREC_IMPRESSIONS_TOPIC": impressions_topic,
                },
            )
            started.append(gw_name)
            gateways[exp] = comp.address
        progress("waiting for ingestion and two gateways (one per experiment) ...")
        stack.wait_serving(started, timeout_s=120)
        rng = np.random.default_rng(seed)
        r = redis.Redis.from_url(redis_url)
        mongo: MongoClient[Any] = MongoClient(stack.mongo_uri)
        try:
            db = mongo["stylerec"]
            world = seed_world(r, db, token, users_per_experiment, rng)
            progress(f"{SYNTHETIC}\nsimulating {users_per_experiment} shoppers per experiment ...")
            planted = shop(gateways, world, shoppers, requests_per_user, seed, progress)
            wait_impressions(db, names, planted, timeout_s)
            send_outcomes(stack.addr_of(ing_name), planted)
            progress("waiting for impressions and outcomes to be archived and attributed ...")
            pipeline = wait_attributed(db, names, planted, timeout_s, progress)
            reports = {
                exp: build_report(db, exp, None, names["impressions"], names["attributions"]) for exp in EXPERIMENTS
            }
        finally:
            r.close()
            mongo.close()
    finally:
        for name in started:
            stack.stop_component(name)
            stack.components.pop(name, None)
        if own:
            stack.down()
            if tmp is not None:
                tmp.cleanup()

    def verdict(exp: str, metric: str) -> dict[str, Any]:
        return next(c for c in reports[exp]["comparisons"] if c["metric"] == metric)

    planted_ctr, aa_ctr, aa_conv = verdict("planted", "ctr"), verdict("aa", "ctr"), verdict("aa", "conversion")
    return {
        "benchmark": SYNTHETIC,
        "shoppers": shoppers.__dict__,
        "users_per_experiment": users_per_experiment,
        "requests_per_user": requests_per_user,
        "seed": seed,
        "pipeline": pipeline,
        "reports": reports,
        "checks": {
            "planted_lift_detected": planted_ctr["significant"] and (planted_ctr["ci95"][0] or 0) > 0,
            "aa_not_significant": not aa_ctr["significant"] and not aa_conv["significant"],
            "every_planted_outcome_attributed": pipeline["attributed_as_planted"] == pipeline["outcomes_planted"]
            and pipeline["attributed_not_planted"] == 0,
        },
        "wall_seconds": round(time.monotonic() - t0, 1),
    }


def write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "online.json"
    path.write_text(json.dumps(result, indent=2))
    return path
