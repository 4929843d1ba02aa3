"""Apply throughput of one scoring replica: part of `stylerec bench scoring` (the ``apply`` block).

The question it answers is the one a load run cannot isolate: how many events per second can a
scoring replica apply (state, fold-in, Redis) when its input is already there? In one run:

* a private embedded stack (broker, Redis, Mongo-protocol server) gets the most recent real
  Online Retail purchases as its archive (the model's history, archived an hour "before" the
  run) and a ``user-events`` topic pre-filled with ``--apply-events`` shopping-session events
  over those customers and items: **synthetic sessions of real users and items**, drawn by the
  load run's own workload (cli/load/driver.py), labelled so in the JSON;
* one scoring replica starts (rebuild from the archive, EASE trained at start-up), and its own
  ``events_applied_total`` counter is read until it has applied the whole topic;
* baselines in the same run on the same topic: (a) a bare kafka-python consumer reading every
  record (no decoding, no work), (b) the same replica's work without Kafka and Redis: the state
  and the batched fold-in on the very model scoring serves, poll-sized chunks of the same events;
* the per-user fold-in cost, one user at a time against the batched product, on that model;
* the heavy shoppers' fold-in (the users of the longest histories, one new item each time): the
  product over the whole history against kept score sums (services/scoring/user_sums.py).

Nothing is asserted: this is a command; the summary compares the apply rate with the ingestion
stream rate of `stylerec bench ingest` when that file is there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from pymongo import MongoClient
from stylerec.v1 import common_pb2
from tqdm import tqdm

from cli.bench.scoring_env import scoring_bench_env
from cli.datasets.retail import SHARED_DATA, load_purchases
from cli.load.driver import Mix, Workload
from cli.localstack.stack import Stack, StackError, metric_sum
from libs.common.archive_progress import ProgressWriter
from libs.common.kafka import USER_EVENTS
from libs.common.pseudonym import Pseudonymizer
from libs.common.settings import DEV_PSEUDONYM_SECRET
from services.ingestion.archiver import event_document
from services.scoring.config import ScoringSettings
from services.scoring.foldin import ModelHolder, Recommender
from services.scoring.interactions import EventRecord, InteractionState
from services.scoring.registry import ModelRegistry, ServingModel
from services.scoring.user_sums import UserSums

APPLIED = "stylerec_scoring_events_applied_total"
HISTORY_PURCHASES = 60_000  # the demo's slice of Online Retail: fits the 2-core box
HEAVY_USERS = 50  # the heavy-shopper measurement: this many users of the longest histories
HEAVY_ROUNDS = 10  # ... each given one new item this many times
CHUNK = 5000  # scoring's default STYLEREC_FOLDIN_BATCH_MAX: the micro-batch the consumer gets


def record_of(e: common_pb2.Event) -> EventRecord:
    return EventRecord(e.event_id, e.user_id, e.item_id, int(e.type), e.timestamp.seconds + e.timestamp.nanos / 1e9)


def session_events(n: int, purchases: list[Any], pseudo: Callable[[str], str]) -> list[common_pb2.Event]:
    """``n`` events of shopping sessions over the customers and items of ``purchases`` (synthetic
    sessions, real ids), already in the form ingestion publishes (pseudonymized users)."""
    from collections import Counter

    users = Counter(p.customer for p in purchases)
    items = Counter(p.stock_code for p in purchases)
    workload = Workload(list(users), list(users.values()), list(items), list(items.values()), Mix(), "apply")
    out: list[common_pb2.Event] = []
    now = time.time()
    while len(out) < n:
        for e in workload.write(now).events:
            e.user_id = pseudo(e.user_id)
            out.append(e)
    return out[:n]


def prefill(bootstrap: str, events: list[common_pb2.Event]) -> float:
    """Publish ``events`` to user-events keyed by user, the way ingestion does; returns seconds."""
    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=20, batch_size=256 * 1024)
    t0 = time.perf_counter()
    for e in events:
        producer.send(USER_EVENTS, key=e.user_id.encode(), value=e.SerializeToString())
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def bare_consumer(bootstrap: str, n: int) -> float:
    """Baseline (a): records/s of a kafka-python consumer that only reads the topic."""
    c = KafkaConsumer(
        USER_EVENTS,
        bootstrap_servers=[bootstrap],
        group_id=f"bench-bare-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=CHUNK,
        fetch_max_wait_ms=50,
    )
    got = 0
    t0 = time.perf_counter()
    first: float | None = None
    try:
        while got < n and time.perf_counter() - t0 < 300:
            for recs in c.poll(timeout_ms=200).values():
                if first is None:
                    first = time.perf_counter()
                got += len(recs)
    finally:
        c.close()
    if got < n:
        raise StackError(f"bare consumer read {got} of {n} records")
    return n / (time.perf_counter() - (first or t0))


def seed_archive(stack: Stack, purchases: list[Any], pseudo: Callable[[str], str]) -> tuple[int, ProgressWriter]:
    """The archive scoring rebuilds from: the purchases written the way the archiver writes them,
    progress document included (its heartbeat keeps going until the caller stops it), so the
    replica's archive tail runs as in production: nothing to read back."""
    from cli.datasets.retail import to_events

    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_uri)
    db = client["stylerec"]
    db["events"].create_index("archived_at")
    writer = ProgressWriter(db).start()
    events = to_events(purchases)
    for start in range(0, len(events), 5000):
        stamp = writer.begin()
        docs = []
        for e in events[start : start + 5000]:
            e.user_id = pseudo(e.user_id)
            docs.append({"_id": e.event_id, **event_document(e, stamp)})
        db["events"].insert_many(docs)
        writer.done()
    return len(events), writer


def applied_by_scoring(stack: Stack) -> float:
    samples = stack.scrape("scoring")
    return metric_sum(samples, APPLIED, source="kafka")


def watch_apply(stack: Stack, n: int, bar: tqdm, timeout_s: float) -> dict[str, Any]:
    """Poll scoring's counter until it applied ``n`` records; rate over the applying interval."""
    t0 = time.monotonic()
    first: tuple[float, float] | None = None
    samples: list[tuple[float, float]] = []
    while time.monotonic() - t0 < timeout_s:
        try:
            done = applied_by_scoring(stack)
        except OSError:
            time.sleep(0.5)
            continue
        now = time.monotonic()
        samples.append((round(now - t0, 2), done))
        bar.set_postfix_str(f"applied {int(done):,}/{n:,}")
        if done > 0 and first is None:
            first = (now, done)
        if done >= n:
            assert first is not None
            span = max(1e-3, now - first[0])
            return {
                "events": n,
                "seconds": round(span, 2),
                "events_per_s": round((done - first[1]) / span, 1),
                "samples": samples[-50:],
            }
        time.sleep(0.25)
    raise StackError(f"scoring applied {samples[-1][1] if samples else 0:.0f} of {n} events in {timeout_s:.0f} s")


def in_process(
    stack: Stack, purchases: list[Any], events: list[common_pb2.Event], pseudo: Callable[[str], str]
) -> dict[str, Any]:
    """Baseline (b) and the per-user cost: scoring's state and fold-in, no Kafka, no Redis."""
    from cli.datasets.retail import to_events

    settings = ScoringSettings()
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_uri)
    registry = ModelRegistry(client["stylerec"], settings.models_collection)
    doc = registry.latest()
    if doc is None:
        raise StackError("scoring published no model")
    sm = registry.load(doc)
    client.close()
    state = InteractionState(settings.event_weights(), settings.half_life_days * 86400)
    history = to_events(purchases)
    for e in history:
        e.user_id = pseudo(e.user_id)
    state.apply_all(record_of(e) for e in history)
    holder = ModelHolder()
    holder.swap(sm)
    sums = UserSums(settings.foldin_sums_users, settings.foldin_sums_min_items)
    engine = Recommender(state, holder, settings.new_item_slots, user_sums=sums)
    records = [record_of(e) for e in events]

    t0 = time.perf_counter()
    for start in range(0, len(records), CHUNK):
        chunk = records[start : start + CHUNK]
        fresh = state.apply_many(chunk)
        engine.top_n_many({ev.user_id for ev, new in zip(chunk, fresh, strict=True) if new}, settings.top_n)
    math_s = time.perf_counter() - t0

    users = state.users()[:2000]
    plain = Recommender(state, holder, settings.new_item_slots)
    t0 = time.perf_counter()
    for u in users:
        plain.top_n(u, settings.top_n)
    single_ms = (time.perf_counter() - t0) * 1000 / len(users)
    t0 = time.perf_counter()
    for start in range(0, len(users), 500):
        plain.top_n_many(users[start : start + 500], settings.top_n)
    batched_ms = (time.perf_counter() - t0) * 1000 / len(users)
    heavy = heavy_shoppers(state, holder, sm, settings)
    return {
        "model": {"version": sm.version, "algorithm": sm.algorithm, "items": len(sm.item_ids)},
        "state_and_foldin_events_per_s": round(len(records) / math_s, 1),
        "foldin_per_user_ms": {
            "users": len(users),
            "one_at_a_time": round(single_ms, 4),
            "batched_500": round(batched_ms, 4),
            "ratio_batched_vs_single": round(batched_ms / single_ms, 3) if single_ms else None,
        },
        "heavy_shoppers_foldin": heavy,
    }


def heavy_shoppers(
    state: InteractionState, holder: ModelHolder, sm: ServingModel, settings: ScoringSettings
) -> dict[str, Any]:
    """Per-user cost of folding in one new item for the users of the longest histories: the
    batched product over each whole history against kept score sums (built before the clock
    starts, as a running replica has them). Both answer the same users after the same events;
    their lists are compared, and must be identical."""
    users = sorted(state.users(), key=lambda u: (-len(state.history(u)), u))[:HEAVY_USERS]
    plain = Recommender(state, holder, settings.new_item_slots)
    kept = Recommender(state, holder, settings.new_item_slots, user_sums=UserSums(len(users), 1))
    kept.top_n_many(users, settings.top_n)
    unseen = {u: [i for i in sm.item_ids if i not in state.history(u)] for u in users}
    times = {"product": 0.0, "kept_sums": 0.0}
    same = True
    for r in range(HEAVY_ROUNDS):
        state.apply_many(
            [EventRecord(f"heavy-{r}-{u}", u, unseen[u][r], 1, state.watermark) for u in users if len(unseen[u]) > r]
        )
        answers = {}
        for name, engine in (
            (("product", plain), ("kept_sums", kept)) if r % 2 else (("kept_sums", kept), ("product", plain))
        ):
            t0 = time.perf_counter()
            answers[name] = engine.top_n_many(users, settings.top_n)
            times[name] += time.perf_counter() - t0
        same = same and all(answers["product"][u].items == answers["kept_sums"][u].items for u in users)
    per = {k: round(v * 1000 / (HEAVY_ROUNDS * len(users)), 4) for k, v in times.items()}
    lengths = sorted(len(state.history(u)) for u in users)
    return {
        "users": len(users),
        "history_items_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]] if lengths else [],
        "per_user_ms": per,
        "ratio_kept_sums_vs_product": round(per["kept_sums"] / per["product"], 3) if per["product"] else None,
        "identical_lists": same,
    }


def bench_apply(n_events: int, bar: tqdm, data_dir: Path = SHARED_DATA) -> dict[str, Any]:
    import tempfile

    pseudo = Pseudonymizer(DEV_PSEUDONYM_SECRET)
    purchases, label = load_purchases(HISTORY_PURCHASES, data_dir)
    with tempfile.TemporaryDirectory(prefix="stylerec-bench-apply-") as tmp:
        stack = Stack(dir=Path(tmp))
        stack.env_overrides = scoring_bench_env(train_on_start=True, max_poll_interval_ms=30000)
        try:
            stack.start_infra()
            t0 = time.perf_counter()
            archived, archiver = seed_archive(stack, purchases, pseudo)
            seed_s = time.perf_counter() - t0
            bar.update(1)
            events = session_events(n_events, purchases, pseudo)
            produce_s = prefill(stack.kafka_bootstrap, events)
            bar.update(1)
            bare = bare_consumer(stack.kafka_bootstrap, len(events))
            bar.update(1)
            t0 = time.perf_counter()
            stack.start_service("scoring")
            stack.wait_serving(["scoring"], timeout_s=300)
            startup_s = time.perf_counter() - t0
            applied = watch_apply(stack, len(events), bar, timeout_s=900)
            bar.update(1)
            local = in_process(stack, purchases, events, pseudo)
            bar.update(1)
            archiver.stop()
        finally:
            stack.down()
    new_pairs = len({(e.user_id, e.item_id) for e in events})
    return {
        "data": (
            f"{label}: {archived:,} purchases as the archive; SYNTHETIC shopping sessions over those customers"
            f" and items for the topic ({len(events):,} events, {new_pairs:,} distinct (user, item) pairs)"
        ),
        "events": len(events),
        "seed_archive_seconds": round(seed_s, 1),
        "prefill_produce_seconds": round(produce_s, 1),
        "scoring_startup_seconds_incl_rebuild_and_training": round(startup_s, 1),
        "scoring": applied,
        "baseline_bare_consumer_events_per_s": round(bare, 1),
        "ratio_vs_bare_consumer": round(applied["events_per_s"] / bare, 3) if bare else None,
        **local,
        "ratio_vs_state_and_foldin": round(applied["events_per_s"] / local["state_and_foldin_events_per_s"], 3),
    }
