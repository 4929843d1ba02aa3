"""Scenario 8: a stalled consumer builds a backlog, the lag metric rises and the lag alert fires.

The consumer is the ingestion archiver (group ``archiver`` on ``user-events``) of a private
stack. Its store, the Mongo-protocol server, is frozen with SIGSTOP: every bulk write times
out, the batch is not committed and is retried — a consumer that makes no progress while
its process (and its /metrics endpoint) stays up. Events keep arriving on the topic.

A sampler scrapes the archiver's real ``/metrics`` every ``SCRAPE_S`` through three phases
(quiet with traffic, backlog, drain after SIGCONT) and keeps every
``stylerec_kafka_consumer_lag_messages{group="archiver"}`` sample. Those recorded values,
unchanged, become the ``input_series`` of a promtool rule test over the real rule files
(deploy/prometheus/rules), and ``promtool test rules`` must show StyleRecConsumerLagGrowing
quiet before the backlog, firing during it, and quiet after the drain.

Time is dilated, and only time: the rule wants lag > 1000 growing for 15 minutes; a test
cannot wait that long, so each real scrape is fed as one ``RULE_STEP`` of rule time
(0.5 s becomes 45 s, 90 times). The process exports lag at most every 5 s, so the rule's 15-minute
deriv window (10 s of the run) spans at least one real update while events keep coming
(the stalled handler fails in about a second, so the export is not held up). "Firing" is
judged at the last scrape before production stops: after that a stalled consumer's lag is
flat, the rule's deriv is 0 and the alert (rightly: "growing") resolves.

The drain is checked with exact counts: every event produced is archived once.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymongo import MongoClient
from stylerec.v1 import common_pb2

from cli.localstack.stack import REPO, Stack
from libs.common.kafka import USER_EVENTS, ProtoProducer
from tests.reliability.faults import private_stack, scrape, tail, wait_for

pytestmark = pytest.mark.integration

NAME = "ingestion"
GROUP = "archiver"
LAG = "stylerec_kafka_consumer_lag_messages"
SCRAPE_S = 0.5
RULE_STEP = "45s"
STEP_S = 45
QUIET_S = 8.0
BACKLOG_S = 26.0
RATE_PER_S = 300
RULES = REPO / "deploy" / "prometheus" / "rules"
ALERT = "StyleRecConsumerLagGrowing"
OUT = REPO / "out" / "reliability"


class Sampler:
    """Scrapes the archiver's lag series every SCRAPE_S; one row per scrape: phase, {partition: lag}."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.phase = "quiet"
        self.rows: list[tuple[str, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            row: dict[str, float] = {}
            for (name, labels), value in scrape(self.stack, NAME).items():
                ls = dict(labels)
                if name == LAG and ls.get("group") == GROUP and ls.get("topic") == USER_EVENTS:
                    row[ls["partition"]] = value
            self.rows.append((self.phase, row))
            self._stop.wait(max(0.0, SCRAPE_S - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def total(self, i: int) -> float:
        return sum(self.rows[i][1].values())

    def last_index(self, phase: str) -> int:
        return max(i for i, (p, _) in enumerate(self.rows) if p == phase)


def event(n: int, tag: str) -> common_pb2.Event:
    e = common_pb2.Event(
        event_id=f"{tag}-{n}", user_id=f"u_{n % 50:032x}", item_id=f"item-{n % 300}", type=common_pb2.VIEW
    )
    e.timestamp.GetCurrentTime()
    return e


def produce(producer: ProtoProducer, tag: str, start: int, count: int, rate: float) -> int:
    """``count`` events at about ``rate``/s (in slices of 0.1 s); returns the next index."""
    per_slice = max(1, int(rate / 10))
    n = start
    while n < start + count:
        t0 = time.monotonic()
        for _ in range(min(per_slice, start + count - n)):
            producer.send(USER_EVENTS, f"u_{n % 50:032x}", event(n, tag))
            n += 1
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
    producer.flush(30)
    return n


def rule_test(sampler: Sampler) -> dict[str, Any]:
    """The promtool unit test: recorded samples as input series, three alert expectations."""
    partitions = sorted({p for _, row in sampler.rows for p in row}, key=int)
    series = []
    for p in partitions:
        values = " ".join(
            ("_" if p not in row else str(int(row[p]))) for _, row in sampler.rows
        )  # "_" = not scraped this time (no series yet)
        series.append(
            {
                "series": f'{LAG}{{job="stylerec-ingestion", instance="ingestion:9101", group="{GROUP}", '
                f'topic="{USER_EVENTS}", partition="{p}"}}',
                "values": values,
            }
        )
    rule = next(
        r
        for g in yaml.safe_load((RULES / "stylerec-alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == ALERT
    )
    annotations = {
        k: v.replace("{{ $labels.group }}", GROUP).replace("{{ $labels.topic }}", USER_EVENTS)
        for k, v in rule["annotations"].items()
    }
    firing = [
        {"exp_labels": {"severity": "warning", "group": GROUP, "topic": USER_EVENTS}, "exp_annotations": annotations}
    ]
    at = {
        "quiet": sampler.last_index("quiet"),
        "backlog": sampler.last_index("backlog"),
        "drained": len(sampler.rows) - 1,
    }
    return {
        "rule_files": [str(RULES / "stylerec-recording.yml"), str(RULES / "stylerec-alerts.yml")],
        "evaluation_interval": RULE_STEP,
        "tests": [
            {
                "name": "archiver stalled by a frozen store (recorded live)",
                "interval": RULE_STEP,
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": f"{at['quiet'] * STEP_S}s", "alertname": ALERT, "exp_alerts": []},
                    {"eval_time": f"{at['backlog'] * STEP_S}s", "alertname": ALERT, "exp_alerts": firing},
                    {"eval_time": f"{at['drained'] * STEP_S}s", "alertname": ALERT, "exp_alerts": []},
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def bp_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory.mktemp("backpressure")) as stack:
        stack.start_service(
            "ingestion",
            extra_env={
                "STYLEREC_ROLE": "archiver",
                "STYLEREC_PSEUDONYM_SECRET": "test-secret-backpressure",
                "STYLEREC_STORE_TIMEOUT_S": "0.2",  # a stalled write fails in about a second
                "STYLEREC_STORE_RETRIES": "0",
                "STYLEREC_HEALTH_INTERVAL_S": "0.5",
            },
        )
        stack.wait_serving([NAME], timeout_s=60)
        yield stack


def test_stalled_archiver_raises_lag_and_fires_the_lag_alert(bp_stack: Stack, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make setup` (installs the Debian package prometheus)"
    tag = f"bp-{uuid.uuid4().hex[:6]}"
    client: MongoClient[Any] = MongoClient(bp_stack.mongo_uri, serverSelectionTimeoutMS=5000)
    events = client["stylerec"]["events"]
    producer = ProtoProducer([bp_stack.kafka_bootstrap], client_id="bp-test")
    # The archiver exports lag once it owns partitions: wait for the first series (lag 0).
    wait_for(
        lambda: any(n == LAG and ("group", GROUP) in ls for n, ls in scrape(bp_stack, NAME)),
        60,
        f"archiver lag series\n{tail(bp_stack.components[NAME].log)}",
    )
    sampler = Sampler(bp_stack).start()
    try:
        # Quiet: traffic the archiver keeps up with.
        n = produce(producer, tag, 0, int(QUIET_S * 20), 20)
        wait_for(lambda: events.count_documents({"_id": {"$regex": f"^{tag}-"}}) == n, 30, "quiet events archived")
        time.sleep(6)  # let one more lag export (every 5 s) show the drained state before the stall
        quiet_n = n

        sampler.phase = "backlog"
        bp_stack.kill_component("mongo", signal.SIGSTOP)
        try:
            n = produce(producer, tag, n, int(BACKLOG_S * RATE_PER_S), RATE_PER_S)
        finally:
            bp_stack.kill_component("mongo", signal.SIGCONT)
            sampler.phase = "drain"

        want = {f"{tag}-{i}" for i in range(n)}
        wait_for(
            lambda: events.count_documents({"_id": {"$regex": f"^{tag}-"}}) >= n,
            90,
            f"{n} events archived after the store thawed\n{tail(bp_stack.components[NAME].log)}",
        )
        wait_for(lambda: sampler.total(len(sampler.rows) - 1) == 0 and len(sampler.rows) > 0, 30, "lag back to 0")
        time.sleep(2)
    finally:
        sampler.stop()
        producer.close()
    got = {d["_id"] for d in events.find({"_id": {"$regex": f"^{tag}-"}}, {"_id": 1})}
    client.close()
    assert got == want, f"missing {sorted(want - got)[:10]}, unexpected {sorted(got - want)[:10]}"
    assert n - quiet_n == int(BACKLOG_S * RATE_PER_S)

    # What the live run showed, before promtool judges it.
    totals = [sampler.total(i) for i in range(len(sampler.rows))]
    phases = [p for p, _ in sampler.rows]
    peak = max(t for t, p in zip(totals, phases, strict=True) if p == "backlog")
    over = sum(1 for t, p in zip(totals, phases, strict=True) if p == "backlog" and t > 1000)
    assert totals[sampler.last_index("quiet")] == 0, totals
    assert peak > 1000, f"the stalled archiver's lag never passed 1000: {totals}"
    # 15 rule minutes = 20 scrapes of 45 s; the alert needs that long over the threshold.
    assert over >= 24, f"only {over} scrapes over 1000 (need 24 to judge a 15-minute 'for'): {totals}"

    test_file = tmp_path / "backpressure.test.yml"
    test_file.write_text(yaml.safe_dump(rule_test(sampler), sort_keys=False, width=1_000_000))
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(test_file, OUT / "backpressure.rules.test.yml")
    summary = {"scrapes": len(totals), "peak_lag": peak, "scrapes_over_1000": over, "produced": n, "lag": totals}
    (OUT / "backpressure.json").write_text(json.dumps(summary))
    print(f"\nbackpressure: peak lag {peak}, {over} scrapes over 1000, {len(totals)} scrapes, {n} events")
    res = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\nlag totals per scrape: {totals}"
