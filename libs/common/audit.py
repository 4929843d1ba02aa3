"""Audit log of administrative actions (ForgetUser, Train): MongoDB ``audit`` plus a JSON log line.

Two sinks on purpose: the collection is what an operator queries ("who erased what,
when"), the log line survives a database outage and reaches the log pipeline. A
record names its target only by a non-reversible reference (a keyed hash, see
libs/common/privacy.py), never by the raw user id nor the pseudonym, so the audit
trail itself holds no personal data. Writing it never fails the audited action:
the action already happened, and a missing Mongo record is logged as an error.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pymongo.database import Database

from libs.common.auth import current_caller
from libs.common.metrics import STORE_ERRORS
from libs.common.stores import with_retries

AUDIT_COLLECTION = "audit"
log = logging.getLogger("stylerec.audit")


def new_audit_id() -> str:
    return f"a_{uuid.uuid4().hex}"


class AuditLog:
    def __init__(self, db: Database | None, service: str, collection: str = AUDIT_COLLECTION) -> None:
        self.collection = db[collection] if db is not None else None
        self.service = service

    def record(
        self,
        action: str,
        outcome: str,
        *,
        target: str = "",
        details: dict[str, Any] | None = None,
        audit_id: str = "",
        caller: str | None = None,
    ) -> dict[str, Any]:
        """Write one record; ``outcome`` is "ok" or "error", ``details`` counts or the error."""
        doc: dict[str, Any] = {
            "_id": audit_id or new_audit_id(),
            "ts": time.time(),
            "caller": caller if caller is not None else current_caller(),
            "service": self.service,
            "action": action,
            "target": target,
            "outcome": outcome,
            "details": dict(details or {}),
        }
        stored = False
        if self.collection is not None:
            coll = self.collection
            try:
                with_retries(lambda: coll.insert_one(dict(doc)))
                stored = True
            except Exception as exc:
                STORE_ERRORS.labels("mongo", "audit_write").inc()
                log.error("audit record not stored", extra={"audit_id": doc["_id"], "error": type(exc).__name__})
        log.info("audit", extra={"audit": doc, "stored": stored})
        return doc
