"""Privacy helpers shared by ingestion, scoring and the style worker.

* :class:`UserRefs` turns a pseudonym into a *user reference*: a second keyed hash,
  under a key derived from the pseudonymization secret. The suppression list of
  forgotten users, the ``user-forget`` commands and the audit log name users only
  by it, so none of them links back to the pseudonymous events that stay in Kafka
  until retention, and none can be reversed without the secret.
* :class:`ForgottenUsers` is that suppression list (MongoDB ``forgotten``): every
  consumer that could bring a forgotten user back (archiver, scoring replay and
  rebuild, training, style worker) filters on it.
* :func:`delete_user_keys` deletes every Redis key named after a user and, in the same
  MULTI/EXEC, tells the gateways (``keys.user_changes_channel()``) to drop the answers they
  kept for that user, so a forgotten shopper's shelf is never served again from memory.
* :func:`redact_user_event` is what a ``user-events`` consumer puts on its
  dead-letter topic: the contract says the topic carries pseudonyms only, so a record
  that breaks it may hold a raw id, and the dead-letter copy must not repeat it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from typing import Any

import redis
from google.protobuf.message import DecodeError
from kafka.consumer.fetcher import ConsumerRecord
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError
from stylerec.v1 import common_pb2

from libs.common import keys
from libs.common.stores import with_retries

PSEUDONYM_RE = re.compile(r"^u_[0-9a-f]{32}$")
USER_REF_RE = re.compile(r"^r_[0-9a-f]{32}$")
FORGOTTEN_COLLECTION = "forgotten"
REDACTED = "<redacted>"


def is_pseudonym(value: str) -> bool:
    return bool(PSEUDONYM_RE.match(value))


class UserRefs:
    """pseudonym → ``r_<32 hex>``; the key is derived from the pseudonymization secret, so every
    service holding that secret computes the same reference and nobody else can."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("pseudonymization secret must not be empty")
        self._key = hmac.new(secret.encode(), b"stylerec/user-ref/v1", hashlib.sha256).digest()

    def __call__(self, pseudonym: str) -> str:
        return "r_" + hmac.new(self._key, pseudonym.encode(), hashlib.sha256).hexdigest()[:32]


class ForgottenUsers:
    """The suppression list: ``forgotten`` documents ``{_id: user_ref, forgotten_at}``.

    Lookups are by reference, one ``$in`` query per batch, so a consumer never needs
    the whole list in memory and a user forgotten a moment ago is already filtered.
    """

    def __init__(self, db: Database, refs: UserRefs, collection: str = FORGOTTEN_COLLECTION) -> None:
        self.collection = db[collection]
        self.refs = refs

    def add(self, ref: str) -> bool:
        """Put ``ref`` on the list; False when it was there already."""
        try:
            with_retries(lambda: self.collection.insert_one({"_id": ref, "forgotten_at": time.time()}))
        except DuplicateKeyError:
            return False
        return True

    def all_refs(self) -> set[str]:
        docs: list[dict[str, Any]] = with_retries(lambda: list(self.collection.find({}, {"_id": 1})))
        return {str(d["_id"]) for d in docs}

    def forgotten_among(self, pseudonyms: Iterable[str]) -> set[str]:
        """The pseudonyms of ``pseudonyms`` that are on the list (one query)."""
        by_ref = {self.refs(p): p for p in set(pseudonyms)}
        if not by_ref:
            return set()
        refs = list(by_ref)
        docs: list[dict[str, Any]] = with_retries(
            lambda: list(self.collection.find({"_id": {"$in": refs}}, {"_id": 1}))
        )
        return {by_ref[str(d["_id"])] for d in docs if str(d["_id"]) in by_ref}


def redact_user_event(record: ConsumerRecord, reason: str) -> tuple[bytes, bytes, str]:
    """(key, value, reason) to dead-letter for a ``user-events`` record.

    A key that is not a pseudonym is dropped; a decodable event keeps every field but a
    non-pseudonym ``user_id``; bytes that do not decode are withheld (only their size and
    a SHA-256 prefix remain, enough to match them against the producer's own logs).
    """
    return _redact(record, reason, common_pb2.Event())


def redact_impressions(record: ConsumerRecord, reason: str) -> tuple[bytes, bytes, str]:
    """(key, value, reason) to dead-letter for an ``impressions`` record (an ``ImpressionBatch``,
    or one ``Impression`` from an older gateway): the rules of :func:`redact_user_event`
    applied to every impression of the batch (the topic carries pseudonyms only)."""
    batch = common_pb2.ImpressionBatch()
    try:
        batch.ParseFromString(record.value or b"")
    except (DecodeError, ValueError, RuntimeError):
        batch.Clear()
    if not batch.impressions:
        return _redact(record, reason, common_pb2.Impression())
    batch.DiscardUnknownFields()
    redacted = 0
    for imp in batch.impressions:
        if imp.user_id and not is_pseudonym(imp.user_id):
            imp.user_id = REDACTED
            redacted += 1
    if redacted:
        reason = f"{reason} (user_id redacted in {redacted} of {len(batch.impressions)})"
    return _safe_key(record), batch.SerializeToString(), reason


def _safe_key(record: ConsumerRecord) -> bytes:
    """The record's key when it is a pseudonym; otherwise dropped."""
    key = record.key or b""
    try:
        return key if is_pseudonym(key.decode()) else b""
    except UnicodeDecodeError:
        return b""


def _redact(
    record: ConsumerRecord, reason: str, msg: common_pb2.Event | common_pb2.Impression
) -> tuple[bytes, bytes, str]:
    safe_key = _safe_key(record)
    value = record.value or b""
    try:
        msg.ParseFromString(value)
    except (DecodeError, ValueError, RuntimeError):
        digest = hashlib.sha256(value).hexdigest()[:16]
        return safe_key, b"", f"{reason} (value withheld: {len(value)} bytes, sha256 {digest})"
    # Unknown fields are bytes nobody can vouch for: they do not travel on.
    msg.DiscardUnknownFields()
    if msg.user_id and not is_pseudonym(msg.user_id):
        msg.user_id = REDACTED
        reason = f"{reason} (user_id redacted)"
    return safe_key, msg.SerializeToString(), reason


def delete_user_keys(r: redis.Redis, user: str) -> int:
    """DEL of :func:`keys.per_user` and the gateways' user-change message in one transaction;
    returns how many keys existed."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(*keys.per_user(user))
    pipe.publish(keys.user_changes_channel(), user)
    deleted, _ = pipe.execute()
    return int(deleted)
