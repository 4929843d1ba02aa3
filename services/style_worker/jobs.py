"""Kafka job handling: embed and stylize jobs in, embeddings / stylized images out.

Delivery is at-least-once (offsets are committed after a batch is handled, a
crash replays it), so every write here is idempotent and a redelivered job
never creates a second result:

* embed: the item records which photo (``style_embedding_ref``) its embedding
  came from; a job for the same photo is not recomputed (Redis is refilled from
  Mongo if it lost the key) but is answered from the stored vector, unless the
  item records (``style_embedding_result_job``) that this job's result was
  already acknowledged — so a kill between storing and sending loses no result.
* stylize: the GridFS file id is *derived* from (content, style, both photo
  refs, strength, preserve-colour), so at most one file can exist per result;
  the ``stylized`` document is checked first, leftovers of a run killed half
  way are removed before writing, and ``result_sent`` records whether the
  ``style-results`` message went out.

Bad input never stops the worker: a missing item or photo, or an image the
guards reject, goes to ``dlq-style-worker`` with a classed reason and the rest
of the batch carries on. Store failures raise, so the whole batch is retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gridfs
import numpy as np
import redis
from bson import ObjectId
from bson.errors import InvalidId
from kafka.errors import KafkaError
from pymongo.database import Database
from pymongo.errors import PyMongoError
from stylerec.v1 import common_pb2, style_pb2

from libs.common import keys
from libs.common.kafka import Decoded, ProtoProducer, now_timestamp
from libs.common.privacy import ForgottenUsers, UserRefs
from services.style_worker.config import StyleWorkerSettings
from services.style_worker.engine import StyleEngine, StylizeRequest, l2_normalize
from services.style_worker.images import ImageRejected, check_encoded_size, encode
from services.style_worker.metrics import IMAGES_REJECTED, JOB_SECONDS, JOBS
from services.style_worker.models import EMBEDDING_DIM

log = logging.getLogger(__name__)
SERVICE = "style-worker"
# Failures of the stores or the broker: never a job's fault, always retried as a batch.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (PyMongoError, redis.RedisError, KafkaError)
KIND_NAMES = {style_pb2.EMBED: "embed", style_pb2.STYLIZE: "stylize"}


class JobRejected(Exception):
    """A job that can never succeed (missing item/photo); ``reason`` is '<class>: <detail>'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_job(job: style_pb2.StyleJob) -> str | None:
    """Structural checks; a non-None answer sends the record to the dead-letter topic as 'invalid: ...'."""
    if job.kind not in KIND_NAMES:
        return f"unknown job kind {job.kind}"
    if not job.content_item_id:
        return "content_item_id is empty"
    if job.kind == style_pb2.STYLIZE and not job.style_item_id:
        return "stylize job without style_item_id"
    if not 0.0 <= job.strength <= 1.0 or job.strength != job.strength:
        return f"strength {job.strength} outside 0..1"
    return None


def embedding_bytes(vector: np.ndarray) -> bytes:
    """The Redis format of docs/contracts.md: 100 x float32 little-endian, L2-normalized."""
    return l2_normalize(vector).astype("<f4").tobytes()


def stylized_file_id(content: str, style: str, content_ref: str, style_ref: str, strength: float, pc: bool) -> ObjectId:
    """Deterministic GridFS id: one possible file per distinct result, so retries cannot duplicate."""
    digest = hashlib.sha1(f"{content}\x00{style}\x00{content_ref}\x00{style_ref}\x00{strength:.4f}\x00{pc}".encode())
    return ObjectId(digest.digest()[:12])


@dataclass
class _Embed:
    decoded: Decoded[style_pb2.StyleJob]
    item_id: str
    image_ref: str
    image: Any  # PIL image
    started: float
    vector: np.ndarray | None = None
    # Other jobs for the same item in this batch: computed once, each still gets its result.
    followers: list[Decoded[style_pb2.StyleJob]] = field(default_factory=list)


@dataclass
class _Stylize:
    decoded: Decoded[style_pb2.StyleJob]
    content_id: str
    style_id: str
    content_ref: str
    style_ref: str
    content_image: Any
    strength: float
    preserve_color: bool
    file_id: ObjectId
    started: float
    previous_ref: str = ""
    style_vector: np.ndarray | None = None
    style_image: Any = None


@dataclass
class _Batch:
    embeds: list[_Embed] = field(default_factory=list)
    stylizes: list[_Stylize] = field(default_factory=list)
    pairs: set[str] = field(default_factory=set)
    embed_items: set[str] = field(default_factory=set)


class StyleJobProcessor:
    """Handles batches from the `style-jobs` and `item-updates` consumers."""

    def __init__(
        self,
        settings: StyleWorkerSettings,
        engine: StyleEngine,
        db: Database[Any],
        r: redis.Redis,
        producer: ProtoProducer,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.fs = gridfs.GridFS(db)
        self.redis = r
        self.producer = producer
        self._attempts: dict[tuple[str, int, int], int] = {}
        try:
            # A job queued before its user was forgotten must not write their name back.
            self.forgotten: ForgottenUsers | None = ForgottenUsers(db, UserRefs(settings.effective_pseudonym_secret()))
        except ValueError:
            self.forgotten = None

    def _requester(self, job: style_pb2.StyleJob) -> str:
        """The pseudonym to record on the stylized image, or "" (none, or forgotten since)."""
        if not job.user_id or self.forgotten is None:
            return job.user_id
        return "" if self.forgotten.forgotten_among([job.user_id]) else job.user_id

    # ------------------------------------------------------------------ item-updates
    def handle_item_updates(self, batch: list[Decoded[common_pb2.ItemUpdate]]) -> None:
        """New or changed photo → an EMBED job on style-jobs (as docs/contracts.md routes it)."""
        futures = []
        for d in batch:
            upd = d.message
            if not upd.item_id:
                self.producer.dead_letter(SERVICE, d.record, "invalid: item update without item_id")
                continue
            if upd.deleted:
                self._put_embedding(upd.item_id, None)
                continue
            if not upd.image_ref:
                continue
            job = style_pb2.StyleJob(
                job_id=f"embed:{upd.item_id}:{upd.image_ref}",
                kind=style_pb2.EMBED,
                content_item_id=upd.item_id,
                requested_at=now_timestamp(),
            )
            futures.append(self.producer.send(self.settings.jobs_topic, upd.item_id, job))
        for f in futures:
            f.get(timeout=10)  # commit only once the jobs are safely on the broker

    # ------------------------------------------------------------------ style-jobs
    def handle_jobs(self, batch: list[Decoded[style_pb2.StyleJob]]) -> None:
        work = _Batch()
        for d in batch:
            try:
                if d.message.kind == style_pb2.EMBED:
                    self._prepare_embed(d, work)
                else:
                    self._prepare_stylize(d, work)
            except (JobRejected, ImageRejected) as exc:
                self._reject(d, exc.reason)
        self._guarded(self._run_embeds, work.embeds)
        self._guarded(self._run_stylizes, work.stylizes)
        log.info(
            "style jobs handled",
            extra={"jobs": len(batch), "embedded": len(work.embeds), "stylized": len(work.stylizes)},
        )

    def _reject(self, d: Decoded[style_pb2.StyleJob], reason: str) -> None:
        """Park the job with its reason, and tell result readers it failed so nobody waits for it."""
        job = d.message
        kind = KIND_NAMES.get(job.kind, "unknown")
        log.warning("job rejected", extra={"job_id": job.job_id, "kind": kind, "reason": reason})
        self.producer.dead_letter(SERVICE, d.record, reason)
        failed = style_pb2.StyleResult(
            job_id=job.job_id,
            kind=job.kind,
            content_item_id=job.content_item_id,
            style_item_id=job.style_item_id,
            error=reason,
            finished_at=now_timestamp(),
        )
        self.producer.send(self.settings.results_topic, job.content_item_id, failed).get(timeout=10)
        JOBS.labels(kind, "dead_letter").inc()

    # ---- inference failures: isolate a poison job, retry an outage ----
    def _guarded(self, stage: Callable[[list[Any]], None], items: list[Any]) -> None:
        """Run a stage; if the *engine* fails, find out whether one job or the runtime is to blame.

        Store and broker errors propagate untouched (the batch is retried). On an
        inference error the stage is rerun job by job: jobs that fail alone are
        poison and go to the dead-letter topic as ``inference_error``, the others
        complete. If every job fails alone, the runtime itself is broken (device
        lost, out of memory): the error propagates and the batch is retried — but
        a job retried ``max_job_attempts`` times is parked, so a lone poison job
        cannot block its partition forever.
        """
        try:
            stage(items)
            return
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            first = exc
        log.warning("inference failed for a batch; retrying job by job", extra={"error": repr(first)})
        failed: list[tuple[Any, Exception]] = []
        for item in items:
            try:
                stage([item])
            except TRANSIENT_ERRORS:
                raise
            except Exception as alone:
                failed.append((item, alone))
        if not failed:
            return
        if len(failed) < len(items):
            for item, err in failed:
                self._reject(item.decoded, f"inference_error: {type(err).__name__}: {err}")
            return
        parked = 0
        for item, err in failed:
            rec = item.decoded.record
            key = (rec.topic, rec.partition, rec.offset)
            self._attempts[key] = self._attempts.get(key, 0) + 1
            if self._attempts[key] >= self.settings.max_job_attempts:
                del self._attempts[key]
                self._reject(item.decoded, f"inference_error: {type(err).__name__}: {err} (after retries)")
                parked += 1
        if len(self._attempts) > 10_000:  # offsets of long-gone batches: forget them
            self._attempts.clear()
        if parked < len(failed):
            raise first

    # ---- loading ----
    def _item(self, item_id: str) -> dict[str, Any]:
        doc = self.db.items.find_one({"_id": item_id})
        if doc is None:
            raise JobRejected(f"missing_item: item {item_id!r} is not in the catalog")
        if not doc.get("image_ref"):
            raise JobRejected(f"missing_image: item {item_id!r} has no photo")
        return dict(doc)

    def _photo(self, item_id: str, image_ref: str) -> Any:
        """Fetch and decode an item photo; the size guard runs on the GridFS length before reading."""
        try:
            grid_out = self.fs.get(ObjectId(image_ref))
        except (InvalidId, TypeError) as exc:
            raise JobRejected(f"missing_image: item {item_id!r} has a malformed image_ref {image_ref!r}") from exc
        except gridfs.NoFile as exc:
            raise JobRejected(f"missing_image: photo {image_ref} of item {item_id!r} is not in GridFS") from exc
        try:
            check_encoded_size(int(grid_out.length), self.engine.limits)
            data = grid_out.read()
            return self.engine.decode(data)
        except ImageRejected as exc:
            IMAGES_REJECTED.labels(exc.kind, "kafka").inc()
            raise ImageRejected(exc.kind, f"item {item_id!r}: {exc.detail}") from exc

    @staticmethod
    def _cached_vector(item: dict[str, Any]) -> np.ndarray | None:
        raw = item.get("style_embedding_raw")
        if item.get("style_embedding_ref") == item.get("image_ref") and raw and len(raw) == EMBEDDING_DIM:
            return np.asarray(raw, dtype=np.float32)
        return None

    # ---- embed ----
    def _prepare_embed(self, d: Decoded[style_pb2.StyleJob], work: _Batch) -> None:
        started = time.perf_counter()
        item_id = d.message.content_item_id
        item = self._item(item_id)
        cached = self._cached_vector(item)
        if item_id in work.embed_items:
            next(e for e in work.embeds if e.item_id == item_id).followers.append(d)
            JOBS.labels("embed", "duplicate").inc()
            return
        if cached is not None:
            if not self.redis.exists(keys.item_embedding(item_id)):
                self._put_embedding(item_id, embedding_bytes(cached))
            # Already embedded: answer from the stored vector unless this very job's result is
            # recorded as sent. A worker killed between storing the embedding and the broker's
            # ack of the result left the job answered nowhere; its redelivery lands here.
            if item.get("style_embedding_result_job") != d.message.job_id:
                self.producer.send(
                    self.settings.results_topic, item_id, self._embed_result(d, item_id, cached, started)
                ).get(timeout=10)
                self._record_embed_sent(item_id, d.message.job_id)
            JOBS.labels("embed", "duplicate").inc()
            return
        work.embed_items.add(item_id)
        work.embeds.append(_Embed(d, item_id, item["image_ref"], self._photo(item_id, item["image_ref"]), started))

    def _store_embedding(self, item_id: str, image_ref: str, vector: np.ndarray) -> None:
        unit = l2_normalize(vector)
        self.db.items.update_one(
            {"_id": item_id},
            {
                "$set": {
                    "style_embedding": [float(x) for x in unit],
                    "style_embedding_raw": [float(x) for x in vector],
                    "style_embedding_ref": image_ref,
                    "style_embedded_at": time.time(),
                }
            },
        )
        self._put_embedding(item_id, embedding_bytes(vector))

    def _put_embedding(self, item_id: str, value: bytes | None) -> None:
        """Write (or delete, with None) an item's embedding and bump the embeddings version in one
        MULTI/EXEC: readers that remember absences (scoring's profiles) re-ask when it moves."""
        pipe = self.redis.pipeline(transaction=True)
        if value is None:
            pipe.delete(keys.item_embedding(item_id))
        else:
            pipe.set(keys.item_embedding(item_id), value)
        pipe.incr(keys.item_embeddings_version())
        pipe.execute()

    def _run_embeds(self, embeds: list[_Embed]) -> None:
        if not embeds:
            return
        vectors = self.engine.embed_many([e.image for e in embeds])
        futures = []
        for e, v in zip(embeds, vectors, strict=True):
            self._store_embedding(e.item_id, e.image_ref, v)
            for d in [e.decoded, *e.followers]:
                result = self._embed_result(d, e.item_id, v, e.started)
                futures.append(self.producer.send(self.settings.results_topic, e.item_id, result))
            JOBS.labels("embed", "ok").inc()
            JOB_SECONDS.labels("embed").observe(time.perf_counter() - e.started)
        for f in futures:
            f.get(timeout=10)
        for e in embeds:  # only now are the results safely out
            self._record_embed_sent(e.item_id, (e.followers or [e.decoded])[-1].message.job_id)

    def _embed_result(
        self, d: Decoded[style_pb2.StyleJob], item_id: str, vector: np.ndarray, started: float
    ) -> style_pb2.StyleResult:
        return style_pb2.StyleResult(
            job_id=d.message.job_id,
            kind=style_pb2.EMBED,
            content_item_id=item_id,
            embedding=[float(x) for x in l2_normalize(vector)],
            finished_at=now_timestamp(),
            latency_seconds=time.perf_counter() - started,
        )

    def _record_embed_sent(self, item_id: str, job_id: str) -> None:
        """Which job's result the broker acknowledged last, so its redelivery is not answered twice."""
        self.db.items.update_one({"_id": item_id}, {"$set": {"style_embedding_result_job": job_id}})

    # ---- stylize ----
    def _prepare_stylize(self, d: Decoded[style_pb2.StyleJob], work: _Batch) -> None:
        started = time.perf_counter()
        job = d.message
        cid, sid = job.content_item_id, job.style_item_id
        pair = f"{cid}:{sid}"
        content = self._item(cid)
        style = self._item(sid)
        strength = float(job.strength) or self.settings.default_strength
        file_id = stylized_file_id(cid, sid, content["image_ref"], style["image_ref"], strength, job.preserve_color)
        doc = self.db.stylized.find_one({"_id": pair})
        if pair in work.pairs or (doc and doc.get("image_ref") == str(file_id) and self.fs.exists(file_id)):
            if doc and doc.get("image_ref") == str(file_id):
                self._finish_duplicate(d, dict(doc), file_id)
            JOBS.labels("stylize", "duplicate").inc()
            return
        item = _Stylize(
            decoded=d,
            content_id=cid,
            style_id=sid,
            content_ref=content["image_ref"],
            style_ref=style["image_ref"],
            content_image=self._photo(cid, content["image_ref"]),
            strength=strength,
            preserve_color=job.preserve_color,
            file_id=file_id,
            started=started,
            previous_ref=str(doc.get("image_ref", "")) if doc else "",
            style_vector=self._cached_vector(style),
        )
        if item.style_vector is None:
            item.style_image = self._photo(sid, style["image_ref"])
        work.pairs.add(pair)
        work.stylizes.append(item)

    def _finish_duplicate(self, d: Decoded[style_pb2.StyleJob], doc: dict[str, Any], file_id: ObjectId) -> None:
        """A redelivered job whose result exists: refresh the reference, resend only an unsent result."""
        job = d.message
        self._store_ref(job.content_item_id, job.style_item_id, str(file_id))
        requester = self._requester(job)
        if requester:
            self.db.stylized.update_one({"_id": doc["_id"]}, {"$addToSet": {"users": requester}})
        if not doc.get("result_sent"):
            result = self._result(d, str(file_id), 0.0)
            self.producer.send(self.settings.results_topic, job.content_item_id, result).get(timeout=10)
            self.db.stylized.update_one({"_id": doc["_id"]}, {"$set": {"result_sent": True}})

    def _store_ref(self, content: str, style: str, ref: str) -> None:
        """The reference readers look up, and the message that tells gateways it is there (one
        MULTI/EXEC: a gateway that hears it reads the reference)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.stylized(content, style), ref, ex=self.settings.stylized_ttl_s)
        pipe.publish(keys.stylized_ready_channel(), json.dumps([content, style]))
        pipe.execute()

    def _result(self, d: Decoded[style_pb2.StyleJob], image_ref: str, latency_s: float) -> style_pb2.StyleResult:
        job = d.message
        return style_pb2.StyleResult(
            job_id=job.job_id,
            kind=style_pb2.STYLIZE,
            content_item_id=job.content_item_id,
            style_item_id=job.style_item_id,
            image_ref=image_ref,
            finished_at=now_timestamp(),
            latency_seconds=latency_s,
        )

    def _run_stylizes(self, stylizes: list[_Stylize]) -> None:
        if not stylizes:
            return
        need = [s for s in stylizes if s.style_vector is None]
        if need:
            vectors = self.engine.embed_many([s.style_image for s in need])
            stored: set[str] = set()
            for s, v in zip(need, vectors, strict=True):
                s.style_vector = v
                if s.style_id not in stored:  # the style item's embedding comes for free: keep it
                    self._store_embedding(s.style_id, s.style_ref, v)
                    stored.add(s.style_id)
        outputs = self.engine.stylize_many(
            [
                StylizeRequest(s.content_image, np.asarray(s.style_vector), s.strength, s.preserve_color)
                for s in stylizes
            ]
        )
        sent = []
        for s, img in zip(stylizes, outputs, strict=True):
            sent.append((s, self._store_stylized(s, img)))
        for s, fut in sent:
            fut.get(timeout=10)
            self.db.stylized.update_one({"_id": f"{s.content_id}:{s.style_id}"}, {"$set": {"result_sent": True}})
            if s.previous_ref and s.previous_ref != str(s.file_id):
                self._delete_file(s.previous_ref)

    def _store_stylized(self, s: _Stylize, img: Any) -> Any:
        data, content_type = encode(img, self.settings.output_format, self.settings.jpeg_quality)
        job = s.decoded.message
        if self.fs.exists(s.file_id):  # leftovers of a run killed between GridFS and Mongo
            self.fs.delete(s.file_id)
        self.fs.put(
            data,
            _id=s.file_id,
            filename=f"stylized/{s.content_id}/{s.style_id}",
            contentType=content_type,
            metadata={
                "kind": "stylized",
                "content_item_id": s.content_id,
                "style_item_id": s.style_id,
                "job_id": job.job_id,
                "width": img.size[0],
                "height": img.size[1],
            },
        )
        pair = f"{s.content_id}:{s.style_id}"
        update: dict[str, Any] = {
            "$set": {
                "image_ref": str(s.file_id),
                "content_item_id": s.content_id,
                "style_item_id": s.style_id,
                "content_image_ref": s.content_ref,
                "style_image_ref": s.style_ref,
                "strength": s.strength,
                "preserve_color": s.preserve_color,
                "job_id": job.job_id,
                "created_at": time.time(),
                "result_sent": False,
            }
        }
        requester = self._requester(job)
        if requester:
            update["$addToSet"] = {"users": requester}
        self.db.stylized.update_one({"_id": pair}, update, upsert=True)
        self._store_ref(s.content_id, s.style_id, str(s.file_id))
        latency = time.perf_counter() - s.started
        JOBS.labels("stylize", "ok").inc()
        JOB_SECONDS.labels("stylize").observe(latency)
        result = self._result(s.decoded, str(s.file_id), latency)
        return self.producer.send(self.settings.results_topic, s.content_id, result)

    def _delete_file(self, ref: str) -> None:
        try:
            self.fs.delete(ObjectId(ref))
        except (InvalidId, TypeError):
            log.warning("stale stylized ref is not an ObjectId", extra={"ref": ref})
