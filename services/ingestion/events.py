"""The event intake pipeline shared by the unary and the streaming RPC.

Two stages, so the stream can overlap them across chunks:

* :meth:`EventIntake.prepare` — validate each event, pseudonymize, assign ids,
  drop in-batch duplicates, admit into the in-flight budget, claim ids in
  Redis and hand the records to the producer (no waiting on the broker);
* :meth:`EventIntake.finish` — wait for the broker's acks, settle the
  idempotency markers and build the caller's answer.

Whole-request problems raise :class:`RequestRejected`; dependency trouble
raises :class:`~services.ingestion.publisher.PublishRefused` subclasses. The
servicer maps both to gRPC status codes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import redis
from stylerec.v1 import common_pb2, ingestion_pb2

from libs.common.pseudonym import Pseudonymizer
from services.ingestion import metrics
from services.ingestion.config import IngestionSettings
from services.ingestion.dedup import Claim, DedupStore
from services.ingestion.publisher import BrokerUnavailable, EventPublisher, PendingBatch, PublishRefused
from services.ingestion.validation import EventLimits, validate_event

log = logging.getLogger(__name__)

TYPE_LABELS: dict[int, str] = {int(v): common_pb2.EventType.Name(v) for v in common_pb2.EventType.values()}


class RequestRejected(Exception):
    """A whole-request violation: the call fails with ``code`` and field violations."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]], reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.violations = violations
        self.reason = reason


class DependencyUnavailable(PublishRefused):
    """Redis (idempotency window) or the broker failed after the events were admitted."""


def deterministic_event_id(event: common_pb2.Event, pseudonym: str) -> str:
    """Same raw event → same id, so a client retrying without ids is still deduplicated.

    Built from the *pseudonymized* user id: the id travels to Kafka and MongoDB,
    and a hash of the raw id could be brute-forced back to it.
    """
    ts = f"{event.timestamp.seconds}.{event.timestamp.nanos}"
    raw = f"{pseudonym}|{event.item_id}|{event.type}|{ts}|{event.value!r}"
    return "e_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def mentions(value: str, raw: str) -> bool:
    """Whether ``raw`` occurs in ``value`` as a whole token (not inside a longer id or number)."""
    start = value.find(raw)
    while start != -1:
        end = start + len(raw)
        before = value[start - 1] if start else ""
        after = value[end] if end < len(value) else ""
        if not before.isalnum() and not after.isalnum():
            return True
        start = value.find(raw, start + 1)
    return False


def scrub_user_mentions(event: common_pb2.Event, raw: str, pseudonym: str) -> None:
    """Replace an event id or context field that quotes the raw user id (``order-<email>-7``).

    Those fields are stored and published as given, so they would carry the raw id past the
    edge. The replacement is a hash over the pseudonym and the original value: deterministic
    (a retry is still deduplicated) and not reversible without the pseudonymization key.
    """

    def scrub(value: str, prefix: str) -> str:
        digest = hashlib.sha256(f"{pseudonym}|{value}".encode()).hexdigest()[:32]
        return f"{prefix}{digest}"

    if event.event_id and mentions(event.event_id, raw):
        event.event_id = scrub(event.event_id, "e_")
    ctx = event.context
    if ctx.session_id and mentions(ctx.session_id, raw):
        ctx.session_id = scrub(ctx.session_id, "s_")
    if ctx.device and mentions(ctx.device, raw):
        ctx.device = scrub(ctx.device, "d_")
    if ctx.page and mentions(ctx.page, raw):
        ctx.page = scrub(ctx.page, "p_")


@dataclass
class Prepared:
    response: ingestion_pb2.IngestEventsResponse
    event_ids: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    pending: PendingBatch | None = None


class EventIntake:
    def __init__(
        self,
        settings: IngestionSettings,
        publisher: EventPublisher,
        dedup: DedupStore,
        pseudonymize: Pseudonymizer,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.dedup = dedup
        self.pseudonymize = pseudonymize
        self.limits = EventLimits(
            max_id_length=settings.max_id_length,
            max_context_length=settings.max_context_length,
            max_past_days=settings.max_past_days,
            max_future_s=settings.max_future_s,
            max_value=settings.max_value,
        )

    def check_request(self, request: ingestion_pb2.IngestEventsRequest, rpc: str) -> None:
        n = len(request.events)
        limit = self.settings.max_batch_events
        if n > limit:
            metrics.REQUEST_REJECTS.labels(rpc, "too_many").inc()
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {n} events exceeds the maximum of {limit}",
                [("events", f"at most {limit} events per call")],
                "too_many",
            )
        size = request.ByteSize()
        if size > self.settings.max_request_bytes:
            metrics.REQUEST_REJECTS.labels(rpc, "too_large").inc()
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes exceeds the maximum of {self.settings.max_request_bytes}",
                [("events", f"at most {self.settings.max_request_bytes} bytes per call; split the batch")],
                "too_large",
            )

    def prepare(self, request: ingestion_pb2.IngestEventsRequest, rpc: str) -> Prepared:
        """Validate and hand the valid, new events to the producer. Mutates ``request``."""
        self.check_request(request, rpc)
        events = request.events
        n = len(events)
        metrics.BATCH_SIZE.labels(rpc).observe(n)
        resp = ingestion_pb2.IngestEventsResponse()
        candidates: list[common_pb2.Event] = []
        seen: dict[str, int] = {}
        pseudonyms: dict[str, str] = {}
        outcomes: Counter[tuple[str, str]] = Counter()
        limits = self.limits
        for i, event in enumerate(events):
            reason = validate_event(event, limits)
            if reason:
                resp.rejected.add(index=i, reason=reason, event_id=event.event_id)
                outcomes[(TYPE_LABELS.get(event.type, "UNKNOWN"), "rejected")] += 1
                continue
            raw = event.user_id
            pseudonym = pseudonyms.get(raw)
            if pseudonym is None:
                pseudonym = pseudonyms[raw] = self.pseudonymize(raw)
            # Replace the raw id in place (and any field quoting it): nothing below this line sees it.
            event.user_id = pseudonym
            scrub_user_mentions(event, raw, pseudonym)
            if not event.event_id:
                event.event_id = deterministic_event_id(event, pseudonym)
            if event.event_id in seen:
                resp.duplicate_indexes.append(i)
                outcomes[(TYPE_LABELS[event.type], "duplicate")] += 1
                continue
            seen[event.event_id] = i
            candidates.append(event)
        batch_dups = len(resp.duplicate_indexes)
        if batch_dups:
            metrics.DEDUP_HITS.labels("batch").inc(batch_dups)
        try:
            return self._claim_and_send(resp, candidates, seen, outcomes, rpc)
        finally:
            for (etype, outcome), count in outcomes.items():
                metrics.EVENTS.labels(etype, outcome).inc(count)

    def _claim_and_send(
        self,
        resp: ingestion_pb2.IngestEventsResponse,
        candidates: list[common_pb2.Event],
        seen: dict[str, int],
        outcomes: Counter[tuple[str, str]],
        rpc: str,
    ) -> Prepared:
        n = len(resp.rejected) + len(resp.duplicate_indexes) + len(candidates)
        if n and len(resp.rejected) == n:
            metrics.REQUEST_REJECTS.labels(rpc, "all_invalid").inc()
            first = resp.rejected[0]
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"all {n} events rejected; first: #{first.index}: {first.reason}",
                [(f"events[{r.index}]", r.reason) for r in resp.rejected[:100]],
                "all_invalid",
            )
        prepared = Prepared(response=resp)
        if not candidates:
            resp.duplicates = len(resp.duplicate_indexes)
            return prepared
        self.publisher.admit(len(candidates))
        admitted = len(candidates)
        try:
            claims = self.dedup.claim([e.event_id for e in candidates])
        except redis.RedisError as exc:
            self.publisher.release(admitted)
            metrics.ADMISSION_REJECTS.labels("dedup_unavailable").inc()
            raise DependencyUnavailable(f"idempotency store unavailable: {type(exc).__name__}", 1.0) from exc
        records: list[tuple[bytes, bytes]] = []
        for event, claim in zip(candidates, claims, strict=True):
            idx = seen[event.event_id]
            if claim is Claim.NEW:
                prepared.event_ids.append(event.event_id)
                prepared.types.append(event.type)
                records.append((event.user_id.encode(), event.SerializeToString()))
            elif claim is Claim.DUPLICATE:
                resp.duplicate_indexes.append(idx)
                metrics.DEDUP_HITS.labels("window").inc()
                outcomes[(TYPE_LABELS[event.type], "duplicate")] += 1
            else:
                resp.rejected.add(
                    index=idx,
                    reason="in_progress: this event id is being ingested by another request; retry shortly",
                    event_id=event.event_id,
                )
                outcomes[(TYPE_LABELS[event.type], "in_progress")] += 1
        if len(records) < admitted:
            self.publisher.release(admitted - len(records))
        resp.duplicates = len(resp.duplicate_indexes)
        if records:
            prepared.pending = self.publisher.send(self.settings.events_topic, records, admitted=len(records))
        # Keep the answer in request order, as callers match indexes.
        if len(resp.duplicate_indexes) > 1:
            ordered = sorted(resp.duplicate_indexes)
            del resp.duplicate_indexes[:]
            resp.duplicate_indexes.extend(ordered)
        if len(resp.rejected) > 1:
            rejected = sorted(resp.rejected, key=lambda r: r.index)
            copies = [
                ingestion_pb2.RejectedEvent(index=r.index, reason=r.reason, event_id=r.event_id) for r in rejected
            ]
            del resp.rejected[:]
            resp.rejected.extend(copies)
        return prepared

    def finish(self, prepared: Prepared) -> ingestion_pb2.IngestEventsResponse:
        """Wait for the broker; settle markers; raise DependencyUnavailable if anything was not acknowledged."""
        resp = prepared.response
        pending = prepared.pending
        if pending is None:
            return resp
        ids = prepared.event_ids
        result = self.publisher.wait(pending, self.settings.events_topic, on_late=self._late_settler(ids))
        published = [eid for eid, ok in zip(ids, result.ok, strict=True) if ok]
        failed = [eid for eid, ok, unk in zip(ids, result.ok, result.unknown, strict=True) if not ok and not unk]
        try:
            self.dedup.settle(published, failed)
        except redis.RedisError as exc:
            # The events are on the broker; the pending markers expire, so a retry re-publishes
            # at worst (consumers are idempotent by event id). Do not fail the call for that.
            log.warning("could not settle idempotency markers", extra={"error": str(exc), "events": len(ids)})
        outcomes = Counter(
            (TYPE_LABELS[etype], "accepted" if ok else "failed")
            for etype, ok in zip(prepared.types, result.ok, strict=True)
        )
        for (label, outcome), count in outcomes.items():
            metrics.EVENTS.labels(label, outcome).inc(count)
        if result.error:
            log.warning(
                "publish failed", extra={"error": result.error, "events": len(ids), "acknowledged": len(published)}
            )
            raise BrokerUnavailable(f"event broker did not confirm delivery: {result.error}", 1.0)
        resp.accepted = len(published)
        return resp

    def _late_settler(self, ids: list[str]) -> Callable[[int, bool], None]:
        def settle(i: int, ok: bool) -> None:
            try:
                if ok:
                    self.dedup.settle([ids[i]], [])
                else:
                    self.dedup.settle([], [ids[i]])
            except redis.RedisError:
                log.warning("late settle failed")

        return settle

    def abandon(self, prepared: Prepared) -> None:
        """Finish a prepared chunk whose answer nobody will read (stream aborted)."""
        with contextlib.suppress(PublishRefused):
            self.finish(prepared)
