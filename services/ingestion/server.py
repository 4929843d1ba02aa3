"""IngestionService servicer: maps the intake pipeline and the catalog onto gRPC.

The domain modules raise plain exceptions; this file alone decides status codes:
whole-request violations → INVALID_ARGUMENT / RESOURCE_EXHAUSTED with BadRequest
details, full in-flight budget or the caller's event rate limit →
RESOURCE_EXHAUSTED with RetryInfo, broker or store trouble → UNAVAILABLE with
RetryInfo.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from libs.common.auth import current_caller
from libs.common.errors import abort_invalid, abort_retryable
from services.ingestion import metrics
from services.ingestion.catalog import ItemCatalog, ItemNotFound
from services.ingestion.events import EventIntake, Prepared, RequestRejected
from services.ingestion.publisher import Overloaded, PublishRefused
from services.ingestion.rate_limit import CallerRateLimiter

log = logging.getLogger(__name__)


class RateLimited(Exception):
    """The caller's event bucket cannot cover this call now; nothing of the call was taken."""

    def __init__(self, caller: str, events: int, retry_after_s: float) -> None:
        super().__init__(
            f"caller {caller!r} is over its ingest rate limit: {events} events need {retry_after_s:.3f}s "
            "more of its budget; nothing of this call was accepted, retry it after the RetryInfo delay"
        )
        self.retry_after_s = retry_after_s


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, RateLimited):
        abort_retryable(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s)
    if isinstance(exc, RequestRejected):
        abort_invalid(context, str(exc), exc.violations, code=exc.code)
    if isinstance(exc, Overloaded):
        abort_retryable(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s)
    if isinstance(exc, PublishRefused):
        abort_retryable(context, grpc.StatusCode.UNAVAILABLE, str(exc), exc.retry_after_s)
    raise exc


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(
        self,
        intake: EventIntake,
        catalog: ItemCatalog | None,
        pipeline_chunks: int = 4,
        limiter: CallerRateLimiter | None = None,
    ) -> None:
        self.intake = intake
        self.catalog = catalog
        self.pipeline_chunks = pipeline_chunks
        self.limiter = limiter or CallerRateLimiter(0, 1)

    def _admit(self, caller: str, events: int) -> None:
        """Charge ``events`` to ``caller``'s bucket before any work, all or nothing."""
        if not self.limiter.enabled:
            return
        if not self.limiter.fits(events):
            metrics.RATE_LIMITED.labels(caller).inc()
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch of {events} events exceeds the per-caller burst of {self.limiter.burst}",
                [("events", f"at most {self.limiter.burst} events per call (rate-limit burst); split the batch")],
                "over_burst",
            )
        decision = self.limiter.acquire(caller, events)
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(caller).inc()
            raise RateLimited(caller, events, decision.retry_after_s)

    def IngestEvents(
        self, request: ingestion_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingestion_pb2.IngestEventsResponse:
        try:
            self._admit(current_caller(), len(request.events))
            return self.intake.finish(self.intake.prepare(request, "IngestEvents"))
        except (RequestRejected, PublishRefused, RateLimited) as exc:
            _abort(context, exc)

    def StreamEvents(
        self, request_iterator: Iterator[ingestion_pb2.IngestEventsRequest], context: grpc.ServicerContext
    ) -> Iterator[ingestion_pb2.IngestEventsResponse]:
        """Bidirectional: chunk k+1 is validated and handed to the producer while chunk k
        awaits its acks; acks go back in order. At most ``pipeline_chunks`` chunks are
        unacknowledged, so a client that outruns the broker is slowed by TCP flow control."""
        ready: queue.Queue[tuple[int, Prepared | Exception] | None] = queue.Queue(self.pipeline_chunks)
        stop = threading.Event()
        # The reader thread does not inherit this thread's context: take the caller here.
        caller = current_caller()

        def put(item: tuple[int, Prepared | Exception] | None) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            counter = 0
            requests = iter(request_iterator)
            while True:
                try:
                    req = next(requests)
                except StopIteration:
                    break
                except Exception as exc:  # client cancelled or the RPC ended
                    log.debug("stream reader ended", extra={"error": str(exc)})
                    break
                counter += 1
                seq = req.sequence or counter
                try:
                    # Chunks before a refused one are acknowledged first (the queue keeps order);
                    # the refused chunk and everything after it are not taken.
                    self._admit(caller, len(req.events))
                    item: Prepared | Exception = self.intake.prepare(req, "StreamEvents")
                except (RequestRejected, PublishRefused, RateLimited) as exc:
                    item = exc
                except Exception as exc:
                    # Never end the stream "successfully" after a failure: the handler re-raises it.
                    log.exception("stream chunk failed", extra={"sequence": seq})
                    item = exc
                if not put((seq, item)):
                    if isinstance(item, Prepared):
                        self.intake.abandon(item)
                    return
                if isinstance(item, Exception):
                    return
            put(None)

        thread = threading.Thread(target=reader, name="stream-reader", daemon=True)
        thread.start()
        try:
            while True:
                entry = ready.get()
                if entry is None:
                    return
                seq, item = entry
                if isinstance(item, Exception):
                    _abort(context, item)
                try:
                    resp = self.intake.finish(item)
                except PublishRefused as exc:
                    _abort(context, exc)
                resp.sequence = seq
                yield resp
        finally:
            stop.set()
            # Chunks already handed to the producer still hold admission: settle them. The reader
            # may be blocked on the client; it notices `stop` and settles whatever it prepares next.
            self._drain(ready)
            thread.join(timeout=0.2)
            self._drain(ready)

    def _drain(self, ready: queue.Queue[tuple[int, Prepared | Exception] | None]) -> None:
        while True:
            try:
                entry = ready.get_nowait()
            except queue.Empty:
                return
            if entry is not None and isinstance(entry[1], Prepared):
                self.intake.abandon(entry[1])

    def _catalog(self, context: grpc.ServicerContext) -> ItemCatalog:
        if self.catalog is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "the catalog is not served by this process")
            raise AssertionError("abort returned")
        return self.catalog

    def UpsertItems(
        self, request: ingestion_pb2.UpsertItemsRequest, context: grpc.ServicerContext
    ) -> ingestion_pb2.UpsertItemsResponse:
        catalog = self._catalog(context)
        try:
            return catalog.upsert(request)
        except (RequestRejected, PublishRefused) as exc:
            _abort(context, exc)

    def GetItem(self, request: ingestion_pb2.GetItemRequest, context: grpc.ServicerContext) -> common_pb2.Item:
        catalog = self._catalog(context)
        try:
            return catalog.get(request.item_id, request.include_image)
        except ValueError as exc:
            abort_invalid(context, str(exc), [("item_id", str(exc))])
        except ItemNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, f"item {exc} not found")
        except PublishRefused as exc:
            _abort(context, exc)
        raise AssertionError("abort returned")
