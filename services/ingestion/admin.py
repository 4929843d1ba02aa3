"""AdminService.ForgetUser: erase one user from every store StyleRec writes.

Hosted by ingestion because it owns the archive and the idempotency window. The
order matters for the consumers racing with it:

1. the user's reference goes on the suppression list (MongoDB ``forgotten``) first,
   so the archiver, scoring and the style worker drop anything of theirs from now on
   (events still in flight on Kafka included);
2. a ``user-forget`` command is published (acks=all) for the scoring replicas, which
   drop the user's row from their in-memory state and their Redis keys;
3. then the stores are cleaned: archived events, the idempotency markers of those
   events, the per-user Redis keys, stylized images only this user asked for (their
   name is removed from shared ones), the impressions shown to the user and their
   attributed (or still pending) outcomes (docs/experiments.md).

Every step is idempotent, so a failed call is simply repeated and a second call
finds nothing left (zero counts). Kafka is append-only: the user's pseudonymous
events stay in ``user-events`` until retention, and every consumer skips them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import redis
from bson import ObjectId
from bson.errors import InvalidId
from gridfs import GridFSBucket
from gridfs.errors import NoFile
from kafka.errors import KafkaError
from pymongo.database import Database
from pymongo.errors import PyMongoError
from stylerec.v1 import admin_pb2, admin_pb2_grpc

from libs.common import keys
from libs.common.audit import AuditLog, new_audit_id
from libs.common.errors import abort_invalid, abort_retryable
from libs.common.kafka import USER_FORGET, ProtoProducer, now_timestamp
from libs.common.privacy import ForgottenUsers, UserRefs, delete_user_keys
from libs.common.stores import with_retries

log = logging.getLogger(__name__)

FORGET_ACTION = "stylerec.v1.AdminService/ForgetUser"
STYLIZED_COLLECTION = "stylized"
REDIS_BATCH = 500


class ForgetFailed(Exception):
    """A store or the broker failed part-way; the call is safe to repeat."""


class UserForgetter:
    def __init__(
        self,
        db: Database,
        r: redis.Redis,
        producer_factory: Callable[[], ProtoProducer],
        pseudonymize: Callable[[str], str],
        refs: UserRefs,
        audit: AuditLog,
        events_collection: str,
        publish_timeout_s: float = 10.0,
        impressions_collection: str = "impressions",
        attribution_collections: tuple[str, ...] = ("attributions", "attribution_pending"),
    ) -> None:
        self.db = db
        self.redis = r
        self._producer_factory = producer_factory
        self._producer: ProtoProducer | None = None
        self._producer_lock = threading.Lock()
        self.pseudonymize = pseudonymize
        self.refs = refs
        self.forgotten = ForgottenUsers(db, refs)
        self.audit = audit
        self.events = db[events_collection]
        self.publish_timeout_s = publish_timeout_s
        self.impressions = db[impressions_collection]
        self.attribution_collections = [db[c] for c in attribution_collections]

    def close(self) -> None:
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close()
                self._producer = None

    def _announce(self, ref: str, audit_id: str) -> int:
        # The producer is made on first use: ingestion must start (and serve events) while the
        # broker is still coming up, and most processes never forget anyone.
        with self._producer_lock:
            if self._producer is None:
                self._producer = self._producer_factory()
            producer = self._producer
        cmd = admin_pb2.ForgetCommand(user_ref=ref, requested_at=now_timestamp(), audit_id=audit_id)
        md = producer.send(USER_FORGET, ref, cmd).get(timeout=self.publish_timeout_s)
        return int(md.offset)

    def forget(self, raw_user_id: str) -> admin_pb2.ForgetUserResponse:
        user = self.pseudonymize(raw_user_id)
        ref = self.refs(user)
        audit_id = new_audit_id()
        resp = admin_pb2.ForgetUserResponse(user_ref=ref)
        try:
            resp.already_forgotten = not self.forgotten.add(ref)
            resp.forget_command_offset = self._announce(ref, audit_id)
            event_ids = self._delete_events(user, resp)
            resp.dedup_keys_deleted = self._delete_keys([keys.dedup_event(e) for e in event_ids])
            resp.redis_keys_deleted = delete_user_keys(self.redis, user)
            self._forget_stylized(user, resp)
            self._forget_impressions(user, resp)
        except (PyMongoError, redis.RedisError, KafkaError) as exc:
            # Only the exception type: store error texts can quote the query (the pseudonym).
            error = type(exc).__name__
            self.audit.record(
                FORGET_ACTION, "error", target=ref, details={"error": error, **_counts(resp)}, audit_id=audit_id
            )
            raise ForgetFailed(f"forget incomplete ({error}); every step is idempotent: call again") from exc
        self.audit.record(FORGET_ACTION, "ok", target=ref, details=_counts(resp), audit_id=audit_id)
        return resp

    def _delete_events(self, user: str, resp: admin_pb2.ForgetUserResponse) -> list[str]:
        docs: list[dict[str, Any]] = with_retries(lambda: list(self.events.find({"user_id": user}, {"_id": 1})))
        ids = [str(d["_id"]) for d in docs]
        if ids:
            resp.events_deleted = with_retries(lambda: self.events.delete_many({"user_id": user})).deleted_count
        return ids

    def _forget_impressions(self, user: str, resp: admin_pb2.ForgetUserResponse) -> None:
        """What answers showed the user, and which of their clicks and purchases were attributed."""
        resp.impressions_deleted = with_retries(lambda: self.impressions.delete_many({"user_id": user})).deleted_count
        for coll in self.attribution_collections:
            resp.attributions_deleted += with_retries(partial(coll.delete_many, {"user_id": user})).deleted_count

    def _delete_keys(self, names: list[str]) -> int:
        n = 0
        for start in range(0, len(names), REDIS_BATCH):
            n += int(self.redis.delete(*names[start : start + REDIS_BATCH]))
        return n

    def _forget_stylized(self, user: str, resp: admin_pb2.ForgetUserResponse) -> None:
        """Images only this user asked for go (file, record, Redis reference); shared ones lose their name."""
        coll = self.db[STYLIZED_COLLECTION]
        docs: list[dict[str, Any]] = with_retries(lambda: list(coll.find({"users": user})))
        bucket = GridFSBucket(self.db)
        for doc in docs:
            pair = doc["_id"]
            others = [u for u in doc.get("users") or [] if u != user]
            if others:
                with_retries(partial(coll.update_one, {"_id": pair}, {"$pull": {"users": user}}))
                resp.stylized_refs_removed += 1
                continue
            ref = str(doc.get("image_ref") or "")
            if ref:
                # Already gone (or never a GridFS id): the record goes anyway.
                with contextlib.suppress(InvalidId, NoFile):
                    bucket.delete(ObjectId(ref))
            with_retries(partial(coll.delete_one, {"_id": pair}))
            content = str(doc.get("content_item_id") or "")
            style = str(doc.get("style_item_id") or "")
            if content and style:
                self.redis.delete(keys.stylized(content, style), keys.stylize_pending(content, style))
            resp.stylized_images_deleted += 1


def _counts(resp: admin_pb2.ForgetUserResponse) -> dict[str, Any]:
    return {
        "already_forgotten": resp.already_forgotten,
        "events_deleted": resp.events_deleted,
        "dedup_keys_deleted": resp.dedup_keys_deleted,
        "redis_keys_deleted": resp.redis_keys_deleted,
        "stylized_images_deleted": resp.stylized_images_deleted,
        "stylized_refs_removed": resp.stylized_refs_removed,
        "impressions_deleted": resp.impressions_deleted,
        "attributions_deleted": resp.attributions_deleted,
        "forget_command_offset": resp.forget_command_offset,
    }


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, forgetter: UserForgetter, max_id_length: int) -> None:
        self.forgetter = forgetter
        self.max_id_length = max_id_length

    def ForgetUser(
        self, request: admin_pb2.ForgetUserRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ForgetUserResponse:
        if not request.user_id.strip():
            abort_invalid(context, "user_id is required", [("user_id", "required: the shop's user id to forget")])
        if len(request.user_id) > self.max_id_length:
            abort_invalid(
                context,
                f"user_id longer than {self.max_id_length} characters",
                [("user_id", f"at most {self.max_id_length} characters")],
            )
        try:
            resp = self.forgetter.forget(request.user_id)
        except ForgetFailed as exc:
            abort_retryable(context, grpc.StatusCode.UNAVAILABLE, str(exc), 1.0)
        log.info(
            "user forgotten",
            extra={"user_ref": resp.user_ref, "events": resp.events_deleted, "redis_keys": resp.redis_keys_deleted},
        )
        return resp
