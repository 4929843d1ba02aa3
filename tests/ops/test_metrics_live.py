"""Every metric a Grafana panel or a Prometheus rule reads is really exported by the
running services — with samples, not just declared.

The stack is the session `stack` fixture (the four services started exactly as
`stylerec up` starts them). Real RPCs go through ingestion, scoring, the style worker
and the gateway, a malformed record goes onto user-events, and a second gateway and
ingestion are started against an unreachable Redis so the failure paths (store errors,
degraded answers, admission rejects) produce their series too. Then each service's
/metrics port is scraped and compared with what the dashboard and rules use.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.protobuf import timestamp_pb2
from kafka import KafkaProducer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from stylerec.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
    style_pb2,
    style_pb2_grpc,
)

from cli.localstack.stack import SERVICES, Component, Stack, free_port
from libs.common import keys
from libs.common.kafka import USER_EVENTS
from tests.ops.prom_server import JOB_OF, prometheus_for
from tests.ops.promql import base_name, dashboard_exprs, dashboards, exported_names_needed, load_rules

pytestmark = pytest.mark.integration

OWNER_PREFIX = {
    "stylerec_ingestion_": "ingestion",
    "stylerec_scoring_": "scoring",
    "stylerec_style_": "style-worker",
    "stylerec_gateway_": "gateway",
}


def png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def now_ts(offset_s: float = 0) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() + offset_s) * 1e9))
    return ts


def scrape(port: int) -> dict[str, int]:
    """Family/series name -> number of samples, from one service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            counts[sample.name] = counts.get(sample.name, 0) + 1
            counts[base_name(sample.name)] = counts.get(base_name(sample.name), 0) + 1
            counts[family.name] = counts.get(family.name, 0) + 1
    return counts


def wait_port(address: str, timeout_s: float = 60) -> None:
    """The broken instances never report SERVING (their Redis is gone), so wait for the port."""
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def broken(stack: Stack, unique_module: str) -> Iterator[dict[str, Component]]:
    """A gateway and an ingestion whose Redis does not exist (a free port nobody listens on)."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = {"STYLEREC_REDIS_URL": dead_redis, "STYLEREC_STORE_TIMEOUT_S": "0.3", "STYLEREC_STORE_RETRIES": "0"}
    started = {}
    try:
        # role=api: no second archiver joining the session's consumer group (no rebalances for others).
        for name, extra in (("gateway", {}), ("ingestion", {"STYLEREC_ROLE": "api"})):
            instance = f"{name}-ops-noredis-{unique_module}"
            started[name] = stack.start_service(name, instance=instance, extra_env={**env, **extra})
        for comp in started.values():
            wait_port(comp.address)
        yield started
    finally:
        for comp in started.values():
            stack.stop_component(comp.name)
            stack.components.pop(comp.name, None)
        stack.save()


@pytest.fixture(scope="module")
def unique_module() -> str:
    return f"{int(time.time() * 1000) % 10**9:09d}"


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def drive_traffic(stack: Stack, broken: dict[str, Component], tag: str) -> None:
    """Real calls down every path the dashboard shows (synthetic ids and images)."""
    ing = ingestion_pb2_grpc.IngestionServiceStub(grpc.insecure_channel(stack.addr_of("ingestion")))
    item_ids = [f"ops-{tag}-i{i}" for i in range(4)]
    photo = png(7)  # one look for all items: a fully coherent style profile for the buyer below
    items = [
        common_pb2.Item(
            item_id=item_id,
            title=f"ops item {i}",
            category="ops-test",
            brand="synthetic",
            price=10.0 + i,
            image=common_pb2.Image(data=photo, content_type="image/png"),
        )
        for i, item_id in enumerate(item_ids)
    ]
    ing.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items), timeout=30)
    # The style worker embeds each new photo (item-updates); profiles need those embeddings.
    r = redis.Redis.from_url(stack.redis_url)
    wait_for("item style embeddings", lambda: all(r.exists(keys.item_embedding(i)) for i in item_ids), 90)

    buyer = [  # 6 purchases of the same look: style confidence ~0.9 -> STYLE_PERSONALIZED
        common_pb2.Event(
            event_id=f"ops-{tag}-buy{i}",
            user_id=f"ops-{tag}-u0",
            item_id=item_ids[i % 2],
            type=common_pb2.PURCHASE,
            timestamp=now_ts(-60 + i),
        )
        for i in range(6)
    ]
    browsers = [  # co-occurrence so CF has something to recommend to the buyer
        common_pb2.Event(
            event_id=f"ops-{tag}-e{u}-{i}",
            user_id=f"ops-{tag}-u{u}",
            item_id=item_ids[i],
            type=common_pb2.VIEW,
            timestamp=now_ts(-30 + i),
        )
        for u in (1, 2)
        for i in range(4)
    ]
    events = buyer + browsers
    bad = common_pb2.Event(event_id=f"ops-{tag}-bad", user_id="", item_id="x", type=common_pb2.VIEW)
    resp = ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[*events, bad]), timeout=30)
    assert resp.accepted == len(events) and len(resp.rejected) == 1
    # The same batch again: duplicates. An all-invalid batch: a whole-request rejection.
    ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[bad]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ack = list(ing.StreamEvents(iter([ingestion_pb2.IngestEventsRequest(events=events[:2])]), timeout=30))
    assert ack

    # A record no consumer can decode: dead-lettered by scoring and the archiver.
    producer = KafkaProducer(bootstrap_servers=[stack.kafka_bootstrap])
    producer.send(USER_EVENTS, key=f"ops-{tag}-poison".encode(), value=b"\xff\xff\xff not a protobuf").get(timeout=10)
    producer.close()

    style = style_pb2_grpc.StyleWorkerServiceStub(grpc.insecure_channel(stack.addr_of("style-worker")))
    style.Embed(style_pb2.EmbedRequest(image=png(99)), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        style.Embed(style_pb2.EmbedRequest(image=b"GIF89a broken"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(stack.addr_of("gateway")))

    def personalized() -> bool:
        answer = gw.GetRecommendations(
            gateway_pb2.GetRecommendationsRequest(user_id=f"ops-{tag}-u0", k=5, want_stylized=True), timeout=10
        )
        return answer.strategy == gateway_pb2.STYLE_PERSONALIZED and len(answer.items) > 0

    # scoring folds the purchases in and writes the style profile; then stylized images are requested.
    wait_for("a STYLE_PERSONALIZED answer with items", personalized, 60)
    # The shopper clicks the top item of an answer: attributed to its impression (experiment panels).
    shown = gw.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=f"ops-{tag}-u0", k=5), timeout=10)
    click = common_pb2.Event(
        event_id=f"ops-{tag}-click",
        user_id=f"ops-{tag}-u0",
        item_id=shown.items[0].item_id,
        type=common_pb2.CLICK,
        timestamp=now_ts(),
        recommendation_id=shown.recommendation_id,
    )
    assert ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=[click]), timeout=30).accepted == 1
    gw.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=f"ops-{tag}-nobody", k=5), timeout=10)
    gw.GetSimilarItems(gateway_pb2.GetSimilarItemsRequest(item_id=item_ids[0], k=3), timeout=10)

    scoring = scoring_pb2_grpc.ScoringServiceStub(grpc.insecure_channel(stack.addr_of("scoring")))
    scoring.TopN(scoring_pb2.TopNRequest(user_id=f"ops-{tag}-u0", k=5), timeout=10)

    # One real training run (popularity: cheap), retried while the archiver has not yet
    # written enough events or another training holds the cluster-wide lock.
    def trained() -> bool:
        try:
            scoring.Train(scoring_pb2.TrainRequest(algorithm="popularity", wait=True), timeout=120)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            return False

    wait_for("a successful popularity training run", trained, 60, every_s=1.0)

    # Failure paths on the instances without Redis.
    broken_gw = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(broken["gateway"].address))
    try:
        broken_gw.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=f"ops-{tag}-u0", k=5), timeout=15)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
    broken_ing = ingestion_pb2_grpc.IngestionServiceStub(grpc.insecure_channel(broken["ingestion"].address))
    with pytest.raises(grpc.RpcError) as err:
        broken_ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events[:1]), timeout=15)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED), err.value


def owner(name: str) -> str | None:
    for prefix, svc in OWNER_PREFIX.items():
        if name.startswith(prefix):
            return svc
    return None


def test_every_metric_used_by_dashboard_and_rules_is_exported(
    stack: Stack, broken: dict[str, Component], unique_module: str
) -> None:
    needed = exported_names_needed()
    assert len(needed) >= 20, f"suspiciously few metrics used: {sorted(needed)}"
    drive_traffic(stack, broken, unique_module)

    ports = {name: stack.components[name].metrics_port for name in SERVICES}
    ports.update({f"{n} (no Redis)": c.metrics_port for n, c in broken.items()})
    missing: dict[str, set[str]] = {}
    deadline = time.monotonic() + 30  # consumer lag is refreshed every 5 s; jobs are asynchronous
    while True:
        scraped = {name: scrape(port) for name, port in ports.items()}
        everywhere: set[str] = set().union(*(set(s) for s in scraped.values()))
        missing = {}
        for metric, where in needed.items():
            svc = owner(metric)
            if svc is not None:
                present = metric in scraped[svc] or metric in scraped.get(f"{svc} (no Redis)", {})
            else:
                present = metric in everywhere
            if not present:
                missing[metric] = where
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    report = "\n".join(f"  {m}  (used by: {', '.join(sorted(w))})" for m, w in sorted(missing.items()))
    assert not missing, f"metrics used by panels/rules but not exported with samples:\n{report}"


def test_process_metrics_and_health_gauges_per_service(stack: Stack) -> None:
    for name in SERVICES:
        scraped = scrape(stack.components[name].metrics_port)
        for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total", "stylerec_serving"):
            assert metric in scraped, f"{name} does not export {metric}"


def test_exposition_passes_promtool_lint(stack: Stack) -> None:
    """promtool's own linter (naming, units, counter suffixes) over each service's /metrics."""
    exe = shutil.which("promtool")
    assert exe, "promtool not found: run `make setup`"
    for name in SERVICES:
        port = stack.components[name].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read()
        res = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, timeout=30)
        problems = (res.stdout + res.stderr).decode().strip()
        assert res.returncode == 0 and not problems, f"{name}:\n{problems}"


def test_real_prometheus_loads_rules_and_runs_every_dashboard_query(stack: Stack, tmp_path: Path) -> None:
    """The Debian Prometheus server scrapes the stack with the repository's rules: every rule
    evaluates without error, every panel query is accepted by the engine, and the job names,
    recording rules and lag series the dashboard is built on carry data."""
    targets = {JOB_OF[name]: [stack.components[name].metrics_port] for name in SERVICES}
    (dash,) = dashboards().values()
    with prometheus_for(targets, tmp_path) as prom:
        # Two scrapes and a rule evaluation are needed before rates exist.
        deadline = time.monotonic() + 30
        while not prom.query("stylerec:grpc_requests:rate5m") and time.monotonic() < deadline:
            time.sleep(0.5)
        groups = prom.api("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        expected = {r.get("alert") or r.get("record") for r in load_rules()}
        assert loaded == expected
        unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not unhealthy, unhealthy
        for where, expr in dashboard_exprs(dash):
            try:
                prom.query(expr.replace("$__rate_interval", "1m"))
            except AssertionError as exc:
                raise AssertionError(f"{where}: Prometheus rejects the query: {exc}") from exc
        up = {r["metric"]["job"]: r["value"][1] for r in prom.query('up{job=~"stylerec-.+"}')}
        assert up == dict.fromkeys(JOB_OF.values(), "1"), up
        assert prom.query("stylerec:grpc_requests:rate5m")
        assert prom.query("stylerec:grpc_error_ratio:rate5m"), "the error ratio is 0, not absent, without errors"
        assert prom.query("stylerec:kafka_consumer_lag_messages:sum")
        assert prom.query('stylerec_style_provider_active{provider="CPUExecutionProvider"} == 1')
