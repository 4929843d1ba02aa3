"""The style worker as a real process: gRPC admin, Kafka jobs, dead letters, idempotency, kill -9.

Everything talks to the session's real broker, Redis and Mongo-protocol server.
Items and photos are seeded straight into Mongo/GridFS the way the catalog
(ingestion) stores them; jobs are published with the project's ProtoProducer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from stylerec.v1 import common_pb2, style_pb2, style_pb2_grpc

from libs.common import keys
from libs.common.errors import violations_of
from services.style_worker.jobs import stylized_file_id
from tests.style_worker.conftest import (
    Worker,
    dead_letters,
    encoded,
    photo,
    png_with_header_size,
    read_topic,
    texture,
    wait_for,
)

pytestmark = pytest.mark.integration


def stub(worker: Worker) -> style_pb2_grpc.StyleWorkerServiceStub:
    return style_pb2_grpc.StyleWorkerServiceStub(grpc.insecure_channel(worker.addr))


def metric(worker: Worker, line_prefix: str) -> float:
    port = worker.stack.components[worker.name].metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stylize_job(job_id: str, content: str, style: str, **kw: object) -> style_pb2.StyleJob:
    return style_pb2.StyleJob(job_id=job_id, kind=style_pb2.STYLIZE, content_item_id=content, style_item_id=style, **kw)  # type: ignore[arg-type]


def results_for(worker: Worker, job_id: str, want: int = 1, timeout_s: float = 30) -> list[style_pb2.StyleResult]:
    def match(r: object) -> bool:
        res = style_pb2.StyleResult()
        res.ParseFromString(r.value)  # type: ignore[attr-defined]
        return res.job_id == job_id

    out = []
    for r in read_topic(worker.stack.kafka_bootstrap, worker.results_topic, match, want, timeout_s):
        res = style_pb2.StyleResult()
        res.ParseFromString(r.value)
        out.append(res)
    return out


# ---------------------------------------------------------------- gRPC admin


def test_health_and_model_info(worker: Worker) -> None:
    with grpc.insecure_channel(worker.addr) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    info = stub(worker).ModelInfo(style_pb2.StyleModelInfoRequest(), timeout=10)
    assert info.active_providers[-1] == "CPUExecutionProvider"
    assert {m.name for m in info.models} == {"arbitrary_predict", "arbitrary_transform", "multistyle26"}
    assert all(m.path.endswith(".onnx") for m in info.models)
    assert info.max_batch_size == 4 and info.max_batch_delay_ms == 20
    assert info.batching_mode in ("batched", "parallel", "sequential")
    probes = {p.provider: p for p in info.provider_probes}
    assert probes["CPUExecutionProvider"].loaded
    assert "CUDAExecutionProvider" in probes  # asked for; loaded or not, with a reason when not
    assert probes["CUDAExecutionProvider"].loaded or probes["CUDAExecutionProvider"].reason
    assert metric(worker, f'stylerec_style_provider_active{{provider="{info.active_providers[0]}"}}') == 1.0


def test_embed_and_stylize_previews(worker: Worker) -> None:
    s = stub(worker)
    emb = s.Embed(style_pb2.EmbedRequest(image=encoded(texture())), timeout=30)
    assert len(emb.embedding) == 100 and abs(np.linalg.norm(emb.embedding) - 1.0) < 1e-4
    assert len(emb.raw_embedding) == 100 and emb.provider
    resp = s.Stylize(
        style_pb2.StylizeRequest(content_image=encoded(photo(300, 200)), style_image=encoded(texture())), timeout=60
    )
    img = Image.open(io.BytesIO(resp.image))
    assert img.format == "JPEG" and resp.content_type == "image/jpeg"
    assert (resp.width, resp.height) == img.size == (256, 171)  # max_output_side 256, aspect kept
    assert resp.provider == emb.provider and resp.latency_seconds > 0
    by_vector = s.Stylize(
        style_pb2.StylizeRequest(
            content_image=encoded(photo()), style_embedding=emb.raw_embedding, strength=0.5, preserve_color=True
        ),
        timeout=60,
    )
    assert by_vector.width == 160
    house = s.Stylize(
        style_pb2.StylizeRequest(content_image=encoded(photo()), house_style_weights=[1.0] + [0.0] * 25), timeout=60
    )
    assert (house.width, house.height) == (160, 120)


BOMB = png_with_header_size(30_000, 30_000)
ZERO_STYLE = [0.0] * 100


@pytest.mark.parametrize(
    ("request_kwargs", "field", "reason"),
    [
        ({"style_image": b"x"}, "content_image", "required"),
        ({"content_image": b"not an image", "style_image": b"x"}, "content_image", "corrupt:"),
        ({"content_image": b"\0" * 300_001, "style_image": b"x"}, "content_image", "too_large:"),
        ({"content_image": BOMB, "style_embedding": ZERO_STYLE}, "content_image", "bomb:"),
        ({"content_image": encoded(photo(20, 20)), "style_embedding": ZERO_STYLE}, "content_image", "too_small:"),
        ({"content_image": encoded(photo()), "style_embedding": [0.0] * 7}, "style_embedding", "needs 100"),
        ({"content_image": encoded(photo()), "style_image": b"x", "strength": 2.0}, "strength", "0..1"),
    ],
)
def test_bad_previews_are_invalid_argument_with_details(
    worker: Worker, request_kwargs: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub(worker).Stylize(style_pb2.StylizeRequest(**request_kwargs), timeout=30)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = dict(violations_of(err.value))
    assert field in violations and reason in violations[field], violations


# ---------------------------------------------------------------- Kafka jobs


def test_embed_job_writes_mongo_and_redis(worker: Worker, unique: str) -> None:
    item = f"emb-{unique}"
    ref = worker.seed_item(item, encoded(photo(seed=11)))
    worker.producer.send_and_wait(
        worker.jobs_topic, item, style_pb2.StyleJob(job_id=f"j-{unique}", kind=style_pb2.EMBED, content_item_id=item)
    )
    raw = wait_for(lambda: worker.redis.get(keys.item_embedding(item)), what="embedding in Redis")
    vec = np.frombuffer(raw, dtype="<f4")
    assert vec.shape == (100,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4
    assert worker.redis.ttl(keys.item_embedding(item)) == -1  # owned by the worker, no TTL
    doc = worker.db.items.find_one({"_id": item})
    assert doc["style_embedding_ref"] == ref and len(doc["style_embedding"]) == 100
    np.testing.assert_allclose(doc["style_embedding"], vec, atol=1e-6)
    [result] = results_for(worker, f"j-{unique}")
    assert result.kind == style_pb2.EMBED and len(result.embedding) == 100


def test_item_update_embeds_new_photo_and_delete_drops_it(worker: Worker, unique: str) -> None:
    item = f"upd-{unique}"
    ref = worker.seed_item(item, encoded(photo(seed=12)))
    worker.producer.send_and_wait(worker.updates_topic, item, common_pb2.ItemUpdate(item_id=item, image_ref=ref))
    wait_for(lambda: worker.redis.exists(keys.item_embedding(item)), what="auto-embed from item-updates")
    worker.producer.send_and_wait(worker.updates_topic, item, common_pb2.ItemUpdate(item_id=item, deleted=True))
    wait_for(lambda: not worker.redis.exists(keys.item_embedding(item)), what="embedding removed")


def test_stylize_job_stores_result_once(worker: Worker, unique: str) -> None:
    content, style = f"c-{unique}", f"s-{unique}"
    worker.seed_item(content, encoded(photo(240, 160, seed=13), "JPEG"))
    worker.seed_item(style, encoded(texture(seed=14)))
    job = stylize_job(f"st-{unique}", content, style, strength=0.8, user_id="u-pseudo-1")
    announced = worker.redis.pubsub(ignore_subscribe_messages=True)
    announced.subscribe(keys.stylized_ready_channel())
    worker.producer.send_and_wait(worker.jobs_topic, content, job)
    ref = wait_for(lambda: worker.redis.get(keys.stylized(content, style)), what="stylized reference").decode()
    assert 0 < worker.redis.ttl(keys.stylized(content, style)) <= 3600

    # Gateways hear of it in the same transaction as the reference (their kept PENDING answers restyle).
    def ours() -> bool:
        msg = announced.get_message(timeout=0.5)
        return msg is not None and json.loads(msg["data"]) == [content, style]

    wait_for(ours, timeout_s=10, what="the stylized-ready message of this job")
    announced.close()
    files = worker.stylized_files(content, style)
    assert [str(f["_id"]) for f in files] == [ref]
    img = Image.open(io.BytesIO(worker.fs.get(files[0]["_id"]).read()))
    assert img.size == (240, 160)
    doc = worker.db.stylized.find_one({"_id": f"{content}:{style}"})
    assert doc["image_ref"] == ref and doc["users"] == ["u-pseudo-1"]
    wait_for(lambda: worker.db.stylized.find_one({"_id": f"{content}:{style}"})["result_sent"], what="result_sent")
    [result] = results_for(worker, job.job_id)
    assert result.image_ref == ref and result.kind == style_pb2.STYLIZE
    # the style item's embedding came for free
    assert worker.redis.exists(keys.item_embedding(style))

    # Redelivery (same job) and a second request for the same pair: no second result.
    dup_before = metric(worker, 'stylerec_style_jobs_total{kind="stylize",outcome="duplicate"}')
    worker.producer.send_and_wait(worker.jobs_topic, content, job)
    worker.producer.send_and_wait(
        worker.jobs_topic, content, stylize_job(f"st2-{unique}", content, style, strength=0.8, user_id="u-pseudo-2")
    )
    wait_for(
        lambda: metric(worker, 'stylerec_style_jobs_total{kind="stylize",outcome="duplicate"}') >= dup_before + 2,
        what="both duplicates handled",
    )
    assert [str(f["_id"]) for f in worker.stylized_files(content, style)] == [ref]
    assert len(results_for(worker, job.job_id, want=2, timeout_s=3)) == 1
    assert sorted(worker.db.stylized.find_one({"_id": f"{content}:{style}"})["users"]) == ["u-pseudo-1", "u-pseudo-2"]


def test_leftover_of_a_killed_write_is_replaced_not_duplicated(worker: Worker, unique: str) -> None:
    """A worker that died between the GridFS write and the Mongo record leaves a file behind."""
    content, style = f"lc-{unique}", f"ls-{unique}"
    cref = worker.seed_item(content, encoded(photo(seed=15)))
    sref = worker.seed_item(style, encoded(texture(seed=16)))
    fid = stylized_file_id(content, style, cref, sref, 1.0, False)
    worker.fs.put(
        b"half-written", _id=fid, metadata={"kind": "stylized", "content_item_id": content, "style_item_id": style}
    )
    worker.producer.send_and_wait(worker.jobs_topic, content, stylize_job(f"l-{unique}", content, style))
    wait_for(lambda: worker.redis.get(keys.stylized(content, style)), what="stylized reference")
    files = worker.stylized_files(content, style)
    assert len(files) == 1 and files[0]["_id"] == fid
    assert Image.open(io.BytesIO(worker.fs.get(fid).read())).format == "JPEG"


def test_bad_images_and_jobs_go_to_the_dead_letter_topic(worker: Worker, unique: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    jpeg = encoded(photo(), "JPEG")
    cases = {
        f"big-{unique}": (encoded(noise), "too_large"),  # ~480 kB > 300 kB limit
        f"bomb-{unique}": (png_with_header_size(20_000, 20_000), "bomb"),
        f"trunc-{unique}": (jpeg[: len(jpeg) // 2], "corrupt"),
        f"junk-{unique}": (b"this is not an image" * 10, "corrupt"),
        f"tiny-{unique}": (encoded(photo(16, 16)), "too_small"),
        f"nophoto-{unique}": (None, "missing_image"),
    }
    for item, (data, _) in cases.items():
        worker.seed_item(item, data)
    cases[f"ghost-{unique}"] = (None, "missing_item")  # never seeded
    for item in cases:
        worker.producer.send(
            worker.jobs_topic, item, style_pb2.StyleJob(job_id=item, kind=style_pb2.EMBED, content_item_id=item)
        )
    # structurally invalid jobs are parked by the consumer loop itself
    worker.producer.send(worker.jobs_topic, f"nokind-{unique}", style_pb2.StyleJob(content_item_id="x"))
    worker.producer.send_raw(worker.jobs_topic, f"garbage-{unique}".encode(), b"\xff\xfe not protobuf")
    worker.producer.flush(10)
    for item, (_, kind) in cases.items():
        [dl] = dead_letters(worker, item)
        assert dl.reason.startswith(f"{kind}:"), (item, dl.reason)
        assert dl.service == "style-worker" and dl.source_topic == worker.jobs_topic
        job = style_pb2.StyleJob()
        job.ParseFromString(dl.value)
        assert job.content_item_id == item  # the original message is kept for replay
    [failed] = results_for(worker, f"bomb-{unique}")  # result readers learn of the failure too
    assert failed.error.startswith("bomb:") and not failed.image_ref
    assert dead_letters(worker, f"nokind-{unique}")[0].reason.startswith("invalid:")
    assert dead_letters(worker, f"garbage-{unique}")[0].reason.startswith("undecodable:")
    # a bad stylize job (style photo is a bomb) is parked too, and the worker keeps going
    good = f"good-{unique}"
    worker.seed_item(good, encoded(photo(seed=17)))
    worker.producer.send_and_wait(worker.jobs_topic, good, stylize_job(f"b-{unique}", good, f"bomb-{unique}"))
    assert dead_letters(worker, good)[0].reason.startswith("bomb:")
    worker.producer.send_and_wait(
        worker.jobs_topic, good, style_pb2.StyleJob(job_id=f"g-{unique}", kind=style_pb2.EMBED, content_item_id=good)
    )
    wait_for(lambda: worker.redis.exists(keys.item_embedding(good)), what="good job after bad ones")
    assert metric(worker, 'stylerec_style_images_rejected_total{reason="bomb",source="kafka"}') >= 2
    assert metric(worker, 'stylerec_dead_letters_total{reason="too_large",topic="dlq-style-worker"}') >= 1


def test_kill_mid_batch_then_redelivery_yields_exactly_one_result(worker: Worker, unique: str) -> None:
    """SIGKILL the worker while a batch is in inference (consumed, not committed), restart it."""
    style = f"ks-{unique}"
    worker.seed_item(style, encoded(texture(seed=21)))
    contents = [f"kc{i}-{unique}" for i in range(4)]
    for i, c in enumerate(contents):
        worker.seed_item(c, encoded(photo(seed=30 + i)))
    for i, c in enumerate(contents):
        worker.producer.send(worker.jobs_topic, c, stylize_job(f"k{i}-{unique}", c, style))
    worker.producer.flush(10)
    # The style embedding is written right before the batch goes through the transform network.
    wait_for(
        lambda: (worker.db.items.find_one({"_id": style}) or {}).get("style_embedding_ref"),
        timeout_s=60,
        what="batch in flight",
    )
    os.killpg(worker.stack.components[worker.name].pid, signal.SIGKILL)
    done_at_kill = [c for c in contents if worker.db.stylized.find_one({"_id": f"{c}:{style}"})]
    assert len(done_at_kill) < len(contents), "the batch finished before the kill; nothing was redelivered"
    time.sleep(0.5)
    worker.start()  # same group: the uncommitted jobs come back
    for c in contents:
        wait_for(lambda c=c: worker.redis.get(keys.stylized(c, style)), timeout_s=90, what=f"result for {c}")
    for i, c in enumerate(contents):
        files = worker.stylized_files(c, style)
        assert len(files) == 1, (c, files)
        assert worker.db.stylized.find_one({"_id": f"{c}:{style}"})["image_ref"] == str(files[0]["_id"])
        results = results_for(worker, f"k{i}-{unique}", want=2, timeout_s=2)
        assert len(results) >= 1
        if c not in done_at_kill:
            assert len(results) == 1
