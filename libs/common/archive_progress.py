"""Archive progress: how far each archiver's writes are known to be visible, so a reader can
tail the MongoDB ``events`` archive without re-reading a time window every tick.

Why: scoring's archive sync used to re-read every document archived within a fixed slack
(30 s) of the newest one it had seen, because a bulk write still in flight, or a second
archiver whose clock runs behind, can make a document appear with an ``archived_at`` older than
one already read. That re-read grew with the write rate (35,000 documents a 5-s tick at 1,000
events/s) and competed with the consumer for the CPU.

The contract (collection ``archive_progress``, one document per archiver *process*):

* ``_id``: the archiver's id (host, pid and a random suffix: never reused by a restart);
* ``started_at``: a lower bound of every ``archived_at`` this process will ever write;
* ``safe_before``: every document this process stamped with ``archived_at < safe_before`` is
  visible (its bulk write returned); documents of the batch in flight are stamped later;
* ``heartbeat``: when the document was last written (the archiver's clock).

All three times are the archiver's own clock, the one it stamps ``archived_at`` with, so clock
skew between archivers never enters a comparison of one archiver's bound with its own documents.
A reader's tail then starts at the smallest ``safe_before`` of the live archivers it saw before
its previous read, or at ``started_at`` of an archiver it sees for the first time, and re-reads
at most what was in flight then: a batch per archiver, whatever the write rate.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from libs.common.metrics import STORE_ERRORS

log = logging.getLogger(__name__)

COLLECTION = "archive_progress"
# An archiver whose heartbeat is this far behind the newest one is taken for dead (a killed
# process never removes its document). It must exceed the longest time a live archiver can go
# without writing its document (store retries and timeouts are seconds); one wrongly taken for
# dead is harmless: when it shows up again it counts as new and is re-read from its start.
STALE_S = 120.0


def archiver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ProgressWriter:
    """The archiver side: bracket every bulk write with :meth:`begin` / :meth:`done`.

    :meth:`begin` returns the time to stamp the batch with (never below the last published
    ``safe_before``); :meth:`done` publishes that everything stamped so far is visible. A
    background heartbeat keeps an idle archiver's document fresh.
    """

    def __init__(
        self,
        db: Database[Any],
        collection: str = COLLECTION,
        heartbeat_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is the one the archiver stamps ``archived_at`` with (tests skew it)."""
        self.collection = db[collection]
        self.clock = clock
        self.id = archiver_id()
        self.started_at = clock()
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._in_flight: float | None = None
        self._announced = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archive-progress", daemon=True)

    def start(self) -> ProgressWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Clean shutdown: this process stamps nothing more, so readers may forget it."""
        self._stop.set()
        try:
            self.collection.delete_one({"_id": self.id})
        except Exception:
            STORE_ERRORS.labels("mongo", "archive_progress").inc()

    def begin(self) -> float:
        """Before stamping a batch. Raises while the first announcement cannot be written: no
        document may be archived before readers know this archiver's ``started_at``."""
        if not self._announced:
            self._publish()
        with self._lock:
            self._in_flight = self.clock()
            return self._in_flight

    def done(self) -> None:
        """After the batch's bulk write returned (or failed: a retry is stamped anew)."""
        with self._lock:
            self._in_flight = None
        try:
            self._publish()
        except Exception:
            # The next batch or heartbeat publishes again; until then readers re-read a bit more.
            log.warning("archive progress not written", exc_info=True)

    def _publish(self) -> None:
        with self._lock:
            now = self.clock()
            safe = self._in_flight if self._in_flight is not None else now
        try:
            self.collection.update_one(
                {"_id": self.id},
                {"$set": {"started_at": self.started_at, "safe_before": safe, "heartbeat": now}},
                upsert=True,
            )
        except Exception:
            STORE_ERRORS.labels("mongo", "archive_progress").inc()
            raise
        self._announced = True

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._publish()
            except Exception:
                log.warning("archive progress heartbeat failed", exc_info=True)


@dataclass(frozen=True)
class Progress:
    archiver: str
    started_at: float
    safe_before: float
    heartbeat: float


def live_progress(db: Database[Any], collection: str = COLLECTION, stale_s: float = STALE_S) -> list[Progress]:
    """The archivers that are alive, by their documents (malformed ones are skipped)."""
    out: list[Progress] = []
    for d in db[collection].find({}):
        try:
            out.append(Progress(str(d["_id"]), float(d["started_at"]), float(d["safe_before"]), float(d["heartbeat"])))
        except (KeyError, TypeError, ValueError):
            continue
    if not out:
        return []
    newest = max(p.heartbeat for p in out)
    return [p for p in out if p.heartbeat >= newest - stale_s]


class TailCursor:
    """The reader side: where the next read of the archive must start.

    ``plan()`` is called before each read; it returns the ``archived_at`` to read from, or None
    when no archiver publishes progress (an archiver of an older release): the caller then falls
    back to its own slack rule.
    """

    def __init__(self) -> None:
        self.bound: float | None = None  # smallest safe_before of the live archivers at the last plan
        self.known: set[str] = set()

    def plan(self, progress: list[Progress]) -> tuple[float | None, float | None]:
        """(start of this read, bound to remember once the read succeeded)."""
        if not progress:
            return None, None
        bound = min(p.safe_before for p in progress)
        starts = [p.started_at for p in progress if p.archiver not in self.known]
        if self.bound is None:
            return None, bound
        return min([self.bound, *starts]), bound

    def advance(self, progress: list[Progress], bound: float | None) -> None:
        """After a successful read planned from ``progress``."""
        self.bound = bound
        self.known = {p.archiver for p in progress}
