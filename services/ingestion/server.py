"""IngestionService servicer: validate each event, pseudonymize, publish with acks=all."""

from __future__ import annotations

import hashlib
import logging

import grpc
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from libs.common.errors import abort_invalid, abort_retryable
from libs.common.kafka import USER_EVENTS, ProtoProducer
from libs.common.pseudonym import Pseudonymizer
from services.ingestion.config import IngestionSettings
from services.ingestion.validation import validate_event

log = logging.getLogger(__name__)


def deterministic_event_id(event: common_pb2.Event) -> str:
    """Same raw event → same id, so a client retrying without ids is still deduplicated."""
    ts = f"{event.timestamp.seconds}.{event.timestamp.nanos}"
    raw = f"{event.user_id}|{event.item_id}|{event.type}|{ts}|{event.value}"
    return "e_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


class IngestionServicer(ingestion_pb2_grpc.IngestionServiceServicer):
    def __init__(self, settings: IngestionSettings, producer: ProtoProducer, pseudonymize: Pseudonymizer) -> None:
        self.settings = settings
        self.producer = producer
        self.pseudonymize = pseudonymize

    def IngestEvents(
        self, request: ingestion_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingestion_pb2.IngestEventsResponse:
        n = len(request.events)
        if n > self.settings.max_batch_events:
            abort_invalid(
                context,
                f"batch of {n} events exceeds the maximum of {self.settings.max_batch_events}",
                [("events", f"at most {self.settings.max_batch_events} events per call")],
            )
        resp = ingestion_pb2.IngestEventsResponse()
        accepted: list[common_pb2.Event] = []
        for i, event in enumerate(request.events):
            reason = validate_event(
                event,
                max_id_length=self.settings.max_id_length,
                max_past_days=self.settings.max_past_days,
                max_future_s=self.settings.max_future_s,
            )
            if reason:
                resp.rejected.add(index=i, reason=reason, event_id=event.event_id)
                continue
            out = common_pb2.Event()
            out.CopyFrom(event)
            if not out.event_id:
                out.event_id = deterministic_event_id(event)
            out.user_id = self.pseudonymize(event.user_id)
            accepted.append(out)
        if n and not accepted:
            abort_invalid(
                context,
                f"all {n} events rejected; first: #{resp.rejected[0].index}: {resp.rejected[0].reason}",
                [(f"events[{r.index}]", r.reason) for r in resp.rejected[:100]],
            )
        try:
            futures = [self.producer.send(USER_EVENTS, e.user_id, e) for e in accepted]
            for fut in futures:
                fut.get(timeout=self.settings.publish_timeout_s)
        except Exception as exc:
            log.warning("publish failed", extra={"error": str(exc), "events": len(accepted)})
            abort_retryable(context, grpc.StatusCode.UNAVAILABLE, f"event broker unavailable: {exc}", 1.0)
        resp.accepted = len(accepted)
        return resp
