"""Scenario 5: the style worker is killed (SIGKILL) in the middle of a mixed batch of jobs.

A private stack and one style-worker process consume the real ``style-jobs`` topic. We
publish 12 stylize jobs (12 content photos x 3 style images) and 12 embed jobs (12 more
photos), interleaved, then kill the worker as soon as some results are stored and recorded
as sent while the rest of the batch is still in inference, and restart it on the same port with the same environment
(:meth:`cli.localstack.stack.Stack.restart_component`). The uncommitted jobs come back.

What "exactly one result" means here is what docs/style_worker.md defines:

* store — one GridFS file and one ``stylized`` document per (content, style) pair, the
  document and Redis pointing at that file, no orphan files; one embedding per item
  (Mongo fields + ``emb:{item}`` in Redis) from its current photo;
* ``style-results`` — delivery is at-least-once, readers key results by ``job_id``: every
  job id has a result (none missing, none with ``error``). A job whose result was
  acknowledged *and recorded as sent* before the kill must not be sent again (exactly one
  record); only a job caught between the broker's ack and that record may appear twice.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gridfs
import pytest
import redis
from pymongo import MongoClient
from stylerec.v1 import style_pb2

from cli.localstack.stack import Stack
from libs.common import keys
from libs.common.kafka import STYLE_JOBS, STYLE_RESULTS, ProtoProducer
from tests.reliability.faults import private_stack, read_topic, tail, wait_for
from tests.style_worker.conftest import encoded, photo, texture

pytestmark = pytest.mark.integration

NAME = "style-worker"
N_STYLIZE = 12
N_EMBED = 12
N_STYLES = 3


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory.mktemp("style-crash")) as stack:
        stack.start_service(
            "style-worker",
            extra_env={
                "STYLEREC_MAX_OUTPUT_SIDE": "256",
                "STYLEREC_KAFKA_SESSION_TIMEOUT_MS": "6000",
                "STYLEREC_HEALTH_INTERVAL_S": "0.5",
            },
        )
        stack.wait_serving([NAME], timeout_s=120)
        yield stack


def test_worker_killed_mid_batch_leaves_exactly_one_result_per_job(crash_stack: Stack, tmp_path: Path) -> None:
    t = uuid.uuid4().hex[:6]
    client: MongoClient[Any] = MongoClient(crash_stack.mongo_uri, serverSelectionTimeoutMS=5000)
    db = client["stylerec"]
    fs = gridfs.GridFS(db)
    r = redis.Redis.from_url(crash_stack.redis_url)
    producer = ProtoProducer([crash_stack.kafka_bootstrap], client_id="crash-test")

    def seed(item_id: str, data: bytes) -> str:
        ref = str(fs.put(data, filename=f"items/{item_id}", metadata={"kind": "item-image"}))
        db.items.replace_one({"_id": item_id}, {"_id": item_id, "title": item_id, "image_ref": ref}, upsert=True)
        return ref

    styles = [f"st{k}-{t}" for k in range(N_STYLES)]
    contents = [f"ct{i}-{t}" for i in range(N_STYLIZE)]
    embeds = [f"em{i}-{t}" for i in range(N_EMBED)]
    for k, s in enumerate(styles):
        seed(s, encoded(texture(seed=40 + k)))
    for i, c in enumerate(contents):
        seed(c, encoded(photo(seed=100 + i)))
    refs = {e: seed(e, encoded(photo(seed=300 + i))) for i, e in enumerate(embeds)}

    pairs = {f"sz{i}-{t}": (c, styles[i % N_STYLES]) for i, c in enumerate(contents)}
    embed_jobs = {f"eb{i}-{t}": e for i, e in enumerate(embeds)}
    jobs: list[tuple[str, style_pb2.StyleJob]] = []
    for i in range(max(N_STYLIZE, N_EMBED)):
        if i < N_STYLIZE:
            jid = f"sz{i}-{t}"
            c, s = pairs[jid]
            jobs.append((c, style_pb2.StyleJob(job_id=jid, kind=style_pb2.STYLIZE, content_item_id=c, style_item_id=s)))
        if i < N_EMBED:
            jid = f"eb{i}-{t}"
            e = embed_jobs[jid]
            jobs.append((e, style_pb2.StyleJob(job_id=jid, kind=style_pb2.EMBED, content_item_id=e)))
    for key, job in jobs:
        producer.send(STYLE_JOBS, key, job)
    producer.flush(10)
    total = len(jobs)

    def stored() -> tuple[set[str], set[str]]:
        """Jobs whose result is in the store; stylize jobs whose result is also recorded as sent."""
        done, sent = set(), set()
        for jid, (c, s) in pairs.items():
            doc = db.stylized.find_one({"_id": f"{c}:{s}"})
            if doc:
                done.add(jid)
                if doc.get("result_sent"):
                    sent.add(jid)
        for jid, e in embed_jobs.items():
            item = db.items.find_one({"_id": e}) or {}
            if item.get("style_embedding_ref"):
                done.add(jid)
                if item.get("style_embedding_result_job") == jid:
                    sent.add(jid)
        return done, sent

    # Kill once some results are stored and recorded as sent, while others are still being
    # computed: a batch handles its embeds first, so its stylize jobs are then in inference.
    wait_for(lambda: len(stored()[1]) > 0, 120, "first results recorded as sent", every_s=0.02)
    crash_stack.kill_component(NAME)
    done_at_kill, sent_at_kill = stored()
    assert len(done_at_kill) < total, "every job finished before the kill; nothing was redelivered"

    time.sleep(0.5)
    crash_stack.restart_component(NAME, timeout_s=120)  # same group: the uncommitted jobs come back

    def all_done() -> bool:
        done, sent = stored()
        return len(done) == total and sent == set(pairs) | set(embed_jobs)

    wait_for(all_done, 180, f"every job done after the restart\n{tail(crash_stack.components[NAME].log)}")

    # ---- style-results: by job id, none missing, no error, duplicates only where the project allows
    records = read_topic(crash_stack.kafka_bootstrap, STYLE_RESULTS)
    results = [style_pb2.StyleResult.FromString(rec.value) for rec in records]
    ours = [res for res in results if res.job_id.endswith(f"-{t}")]
    per_job = Counter(res.job_id for res in ours)
    want = set(pairs) | set(embed_jobs)
    missing = sorted(want - set(per_job))
    errors = {res.job_id: res.error for res in ours if res.error}
    assert not missing, f"jobs without a result: {missing} (done at kill: {sorted(done_at_kill)})"
    assert not errors, errors
    assert set(per_job) == want, sorted(set(per_job) - want)
    resent = sorted(j for j in sent_at_kill if per_job[j] != 1)
    assert not resent, f"results recorded as sent before the kill were sent again: {resent} {per_job}"
    assert all(n <= 2 for n in per_job.values()), per_job

    # ---- store: exactly one file/document per pair, no orphans; one embedding per item
    for jid, (c, s) in pairs.items():
        files = list(
            db.fs.files.find({"metadata.kind": "stylized", "metadata.content_item_id": c, "metadata.style_item_id": s})
        )
        assert len(files) == 1, f"{jid}: {len(files)} stylized files for {c}:{s}"
        docs = list(db.stylized.find({"_id": f"{c}:{s}"}))
        assert len(docs) == 1 and docs[0]["image_ref"] == str(files[0]["_id"]), (jid, docs, files)
        assert r.get(keys.stylized(c, s)) == str(files[0]["_id"]).encode(), jid
        stylize_results = [res for res in ours if res.job_id == jid]
        assert {res.image_ref for res in stylize_results} == {str(files[0]["_id"])}, (jid, stylize_results)
    # (the Mongo-protocol server has no count with $in on a nested field: filter here)
    ours_files = sum(
        1 for f in db.fs.files.find({"metadata.kind": "stylized"}) if f["metadata"].get("content_item_id") in contents
    )
    assert ours_files == N_STYLIZE, f"{ours_files} stylized files for {N_STYLIZE} pairs (orphans left by the kill?)"
    for jid, e in embed_jobs.items():
        item = db.items.find_one({"_id": e}) or {}
        assert item.get("style_embedding_ref") == refs[e], (jid, item.get("style_embedding_ref"))
        assert len(item.get("style_embedding") or []) == 100, jid
        assert len(r.get(keys.item_embedding(e)) or b"") == 400, jid
        assert all(len(res.embedding) == 100 for res in ours if res.job_id == jid), jid

    print(
        f"\nstyle worker crash: {total} jobs, {len(done_at_kill)} in the store at the kill "
        f"({len(sent_at_kill)} results recorded sent), {len(ours)} result records for "
        f"{len(per_job)} job ids, duplicates: {sorted(j for j, n in per_job.items() if n > 1)}"
    )
    producer.close()
    client.close()
