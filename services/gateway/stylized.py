"""Stylized images: references for the ready ones, deduplicated and rate-limited jobs for the rest.

A stylization (content item drawn in the look of the user's anchor item) takes
hundreds of milliseconds on a CPU, so it never happens on the request path:
the gateway answers with what is ready (``keys.stylized``) and enqueues the
missing ones on ``style-jobs``. ``keys.stylize_pending`` (SET NX with TTL)
makes a job for the same pair go out once per window no matter how many users
or replicas ask; ``keys.stylize_rate(user)`` caps how many new jobs one user can
cause. Publishing happens on a background thread so a slow or absent broker
never delays an answer; a job that cannot be published clears its pending
marker so the next request retries it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from stylerec.v1 import gateway_pb2, style_pb2

from libs.common import keys
from libs.common.kafka import STYLE_JOBS, ProtoProducer, kafka_security, now_timestamp
from services.gateway.catalog import ItemMeta
from services.gateway.config import GatewaySettings
from services.gateway.deadlines import Deadline, DependencyUnavailable
from services.gateway.downstream import Degradation, Downstream, text
from services.gateway.metrics import STYLIZE_JOBS

log = logging.getLogger(__name__)


class StyleJobPublisher:
    """Publishes StyleJob messages from a bounded in-process queue on one background thread."""

    def __init__(
        self, settings: GatewaySettings, cleanup_redis: redis.Redis, max_queue: int = 1000, client_id: str = "gateway"
    ) -> None:
        self.settings = settings
        self._redis = cleanup_redis
        self._queue: queue.Queue[style_pb2.StyleJob | None] = queue.Queue(maxsize=max_queue)
        self._producer: ProtoProducer | None = None
        self._client_id = client_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="style-job-publisher", daemon=True)
        self.last_failure_at = 0.0
        self.last_error = ""

    def start(self) -> StyleJobPublisher:
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        """False for a while after a publish failed: answers then say stylization is unavailable."""
        return time.monotonic() - self.last_failure_at > 10.0 or self.last_failure_at == 0.0

    def submit(self, job: style_pb2.StyleJob) -> bool:
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _ensure_producer(self) -> ProtoProducer:
        if self._producer is None:
            self._producer = ProtoProducer(
                self.settings.kafka_servers,
                client_id=self._client_id,
                max_block_ms=3000,
                request_timeout_ms=5000,
                security=kafka_security(self.settings),
            )
        return self._producer

    def fail(self, job: style_pb2.StyleJob, error: str) -> None:
        self.last_failure_at = time.monotonic()
        self.last_error = error[:200]
        STYLIZE_JOBS.labels("failed").inc()
        log.warning("style job not published", extra={"job_id": job.job_id, "error": error[:200]})
        with contextlib.suppress(redis.RedisError):
            self._redis.delete(keys.stylize_pending(job.content_item_id, job.style_item_id))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None:
                break
            try:
                producer = self._ensure_producer()
                fut = producer.send(STYLE_JOBS, job.content_item_id, job)
                fut.add_errback(lambda exc, j=job: self.fail(j, f"{type(exc).__name__}: {exc}"))
            except Exception as exc:
                self.fail(job, f"{type(exc).__name__}: {exc}")
                self._producer = None
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(5)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(5)
                self._producer.close(5)


@dataclass
class StylizedState:
    status: int  # gateway_pb2.StylizedStatus
    ref: str = ""


# One round trip per answer: ready refs, dedup claims (SET NX + TTL) and the per-user rate
# limit together, atomically. KEYS = [rate, stylized_1..n, pending_1..n];
# ARGV = [n, pending_ttl, limit, window]. Per item: "R:<ref>" ready, "N" claimed (enqueue),
# "P" someone else's pending job, "L" over the user's limit (claim given back).
# In Redis Cluster these keys must share a hash slot; the embedded/compose Redis is one node.
RESOLVE_LUA = """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local out = {}
local new = {}
for i = 1, n do
  local ref = redis.call('GET', KEYS[1 + i])
  if ref then
    out[i] = 'R:' .. ref
  elseif redis.call('SET', KEYS[1 + n + i], '1', 'NX', 'EX', ttl) then
    out[i] = 'N'
    table.insert(new, i)
  else
    out[i] = 'P'
  end
end
if #new > 0 then
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  local allowed = math.max(0, limit - used)
  for j, i in ipairs(new) do
    if j > allowed then
      redis.call('DEL', KEYS[1 + n + i])
      out[i] = 'L'
    end
  end
  local granted = math.min(#new, allowed)
  if granted > 0 then
    redis.call('INCRBY', KEYS[1], granted)
    if redis.call('TTL', KEYS[1]) < 0 then
      redis.call('EXPIRE', KEYS[1], window)
    end
  end
end
return out
"""


class StylizedImages:
    def __init__(self, settings: GatewaySettings, downstream: Downstream, publisher: StyleJobPublisher) -> None:
        self.settings = settings
        self.ds = downstream
        self.publisher = publisher
        self._resolve = downstream.redis.register_script(RESOLVE_LUA)
        self._recent: dict[tuple[str, str], tuple[float, str]] = {}

    def stored(self, pair: tuple[str, str]) -> None:
        """The style worker stored (content, style): forget a remembered PENDING so the next
        resolve reads the reference instead of waiting out ``stylized_pending_recheck_s``."""
        seen = self._recent.get(pair)
        if seen is not None and seen[1] == "P":
            self._recent.pop(pair, None)

    def resolve(
        self,
        user: str,
        anchor: str,
        items: list[ItemMeta],
        deadline: Deadline,
        deg: Degradation,
    ) -> dict[str, StylizedState]:
        """Status (and GridFS reference when ready) of each item drawn in the anchor's style."""
        out: dict[str, StylizedState] = {}
        todo = []
        for meta in items:
            if meta.item_id == anchor or not meta.image_ref:
                # No photo to draw (or it is the anchor itself): nothing to stylize.
                out[meta.item_id] = StylizedState(gateway_pb2.STYLIZED_UNAVAILABLE)
                STYLIZE_JOBS.labels("no_photo").inc()
            else:
                todo.append(meta.item_id)
        if not todo:
            return out
        # Answers this replica saw lately: a ready reference stays valid for a while and a pending
        # job will not finish within a second, so neither needs a round trip on every request.
        now = time.monotonic()
        replies_by_item: dict[str, str] = {}
        for i in todo:
            seen = self._recent.get((i, anchor))
            if seen is not None and now < seen[0]:
                replies_by_item[i] = seen[1]
        asked = [i for i in todo if i not in replies_by_item]
        replies_by_item.update(self._ask(user, anchor, asked, deadline, deg, out) if asked else {})
        if len(self._recent) > 50_000:
            self._recent.clear()
        for i in asked:
            reply = replies_by_item.get(i, "")
            if reply.startswith("R:"):
                self._recent[(i, anchor)] = (now + self.settings.stylized_near_cache_s, reply)
            elif reply in ("N", "P"):
                self._recent[(i, anchor)] = (now + self.settings.stylized_pending_recheck_s, "P")
        todo = [i for i in todo if i in replies_by_item]
        replies = [replies_by_item[i] for i in todo]
        self._apply(user, anchor, todo, replies, out)
        return out

    def _ask(
        self,
        user: str,
        anchor: str,
        todo: list[str],
        deadline: Deadline,
        deg: Degradation,
        out: dict[str, StylizedState],
    ) -> dict[str, str]:
        """Replies per item from Redis (the Lua script, or plain reads while publishing is failing)."""
        publishing = self.publisher.healthy
        try:
            if publishing:
                s = self.settings
                keys_ = [
                    keys.stylize_rate(user),
                    *[keys.stylized(i, anchor) for i in todo],
                    *[keys.stylize_pending(i, anchor) for i in todo],
                ]
                args = [len(todo), s.stylize_pending_ttl_s, s.stylize_rate_per_user, s.stylize_rate_window_s]
                replies = [
                    text(x)
                    for x in self.ds.redis_call("stylize_resolve", lambda r: self._resolve(keys_, args), deadline)
                ]
            else:
                refs = self.ds.redis_call(
                    "stylized_get", lambda r: r.mget([keys.stylized(i, anchor) for i in todo]), deadline
                )
                replies = [f"R:{text(ref)}" if ref else "U" for ref in refs]
        except DependencyUnavailable as exc:
            deg.add(exc)
            for i in todo:
                out[i] = StylizedState(gateway_pb2.STYLIZED_UNAVAILABLE)
            return {}
        if not publishing and any(x == "U" for x in replies):
            deg.add(f"style-jobs: publishing failed recently ({self.publisher.last_error})")
        return dict(zip(todo, replies, strict=True))

    def _apply(
        self, user: str, anchor: str, todo: list[str], replies: list[str], out: dict[str, StylizedState]
    ) -> None:
        for item_id, reply in zip(todo, replies, strict=True):
            if reply.startswith("R:"):
                out[item_id] = StylizedState(gateway_pb2.STYLIZED_READY, reply[2:])
                STYLIZE_JOBS.labels("ready").inc()
            elif reply == "N":
                job = style_pb2.StyleJob(
                    job_id=f"sj_{uuid.uuid4().hex[:16]}",
                    kind=style_pb2.STYLIZE,
                    content_item_id=item_id,
                    style_item_id=anchor,
                    strength=self.settings.stylize_strength,
                    requested_at=now_timestamp(),
                    user_id=user,
                )
                if self.publisher.submit(job):
                    STYLIZE_JOBS.labels("enqueued").inc()
                    out[item_id] = StylizedState(gateway_pb2.STYLIZED_PENDING)
                else:
                    self.publisher.fail(job, "publish queue full")
                    out[item_id] = StylizedState(gateway_pb2.STYLIZED_UNAVAILABLE)
            elif reply == "P":
                STYLIZE_JOBS.labels("deduplicated").inc()
                out[item_id] = StylizedState(gateway_pb2.STYLIZED_PENDING)
            elif reply == "L":
                STYLIZE_JOBS.labels("rate_limited").inc()
                out[item_id] = StylizedState(gateway_pb2.STYLIZED_UNAVAILABLE)
            else:
                out[item_id] = StylizedState(gateway_pb2.STYLIZED_UNAVAILABLE)


def read_stylized_ref(ds: Downstream, item_id: str, style_item: str, deadline: Deadline) -> str:
    """GridFS id of a finished stylization: Redis reference first, the Mongo record if it expired."""
    ref = ""
    with contextlib.suppress(DependencyUnavailable):
        raw = ds.redis_call("stylized_get", lambda r: r.get(keys.stylized(item_id, style_item)), deadline)
        ref = text(raw)
    if ref:
        return ref
    doc: dict[str, Any] | None = ds.mongo_call(
        "stylized_find", lambda db: db["stylized"].find_one({"_id": f"{item_id}:{style_item}"}), deadline
    )
    return str(doc.get("image_ref") or "") if doc else ""
