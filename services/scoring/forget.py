"""Forgotten users on a scoring replica: the suppression filter and the ``user-forget`` listener.

A scoring replica rebuilds its state from three feeds (the MongoDB archive at start
and every sync, ``user-events`` from its committed offsets, and a full replay
whenever the group's offsets are lost), and the trainer reads the archive. The
archive no longer holds a forgotten user's events, but Kafka does until retention,
so every feed goes through :class:`ForgottenFilter`: the set of user references
(keyed hashes of pseudonyms, libs/common/privacy.py) from the ``forgotten``
collection and the ``user-forget`` topic.

:class:`ForgetListener` reads the whole ``user-forget`` topic without a consumer
group (every replica must see every command) and re-reads the list from MongoDB
periodically, so a command that was never published (the admin call failed after
the list was written) still takes effect. Applying a command drops the user's row
from the state and their Redis keys, then rewrites popularity without them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pymongo.database import Database
from stylerec.v1 import admin_pb2, common_pb2

from libs.common.kafka import USER_FORGET, Decoded
from libs.common.privacy import ForgottenUsers, UserRefs, delete_user_keys
from services.scoring.interactions import InteractionState

log = logging.getLogger(__name__)
SECOND_PASS_S = 5.0


class ForgottenFilter:
    """``filter(pseudonym)`` → True when the user is forgotten. Costs nothing while the set is empty."""

    def __init__(self, refs: UserRefs) -> None:
        self.refs = refs
        self._forgotten: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def __call__(self, user: str) -> bool:
        forgotten = self._forgotten
        return bool(forgotten) and self.refs(user) in forgotten

    def __len__(self) -> int:
        return len(self._forgotten)

    def add(self, refs: Iterable[str]) -> set[str]:
        """Add references; returns those that were new."""
        with self._lock:
            new = set(refs) - self._forgotten
            if new:
                self._forgotten = self._forgotten | new
            return new

    def users_of(self, ref: str, users: Iterable[str]) -> list[str]:
        return [u for u in users if self.refs(u) == ref]


def load_filter(db: Database, refs: UserRefs) -> ForgottenFilter:
    """A filter holding the whole suppression list as stored now (trainer, start-up)."""
    f = ForgottenFilter(refs)
    f.add(ForgottenUsers(db, refs).all_refs())
    return f


def skip_forgotten(
    handle: Callable[[list[Decoded[common_pb2.Event]]], None], forgotten: ForgottenFilter
) -> Callable[[list[Decoded[common_pb2.Event]]], None]:
    """Wrap a ``user-events`` batch handler so events of forgotten users are dropped (and committed)."""

    def wrapped(batch: list[Decoded[common_pb2.Event]]) -> None:
        if len(forgotten):
            batch = [d for d in batch if not forgotten(d.message.user_id)]
        if batch:
            handle(batch)

    return wrapped


class ForgetListener:
    def __init__(
        self,
        bootstrap: list[str],
        replica: str,
        db: Database,
        r: redis.Redis,
        state: InteractionState,
        forgotten: ForgottenFilter,
        on_forgotten: Callable[[], None],
        refresh_s: float = 30.0,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.security = dict(security or {})
        self.bootstrap = bootstrap
        self.replica = replica
        self.store = ForgottenUsers(db, forgotten.refs)
        self.redis = r
        self.state = state
        self.forgotten = forgotten
        self.on_forgotten = on_forgotten
        self.refresh_s = refresh_s
        self.applied = 0
        self._refreshed_at = 0.0
        # (due, user): keys deleted once more a little later, in case a rewrite of this user
        # that started before the command (an event already in the batch) finished after it.
        self._second_pass: list[tuple[float, str]] = []
        self._consumer: KafkaConsumer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="user-forget", daemon=True)

    def load(self) -> int:
        """Read the stored list into the filter (before the state is rebuilt); returns its size."""
        self.apply(self.store.all_refs())
        return len(self.forgotten)

    def apply(self, refs: Iterable[str]) -> int:
        """Filter these references from now on and drop the users' rows; returns rows dropped."""
        new = self.forgotten.add(refs)
        if not new:
            return 0
        dropped = 0
        for ref in new:
            for user in self.forgotten.users_of(ref, self.state.users()):
                events = self.state.forget(user)
                # The admin call deletes these too; a replica may have rewritten them since.
                delete_user_keys(self.redis, user)
                self._second_pass.append((time.monotonic() + SECOND_PASS_S, user))
                dropped += 1
                log.info("user forgotten", extra={"user_ref": ref, "events": events})
        self.applied += len(new)
        if dropped:
            self.on_forgotten()
        return dropped

    def start(self) -> ForgetListener:
        self._thread.start()
        return self

    def _connect(self) -> KafkaConsumer:
        c = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id=f"scoring-user-forget-{self.replica}",
            **self.security,
        )
        tp = TopicPartition(USER_FORGET, 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        return c

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._consumer is None:
                    self._consumer = self._connect()
                polled = self._consumer.poll(timeout_ms=500)
                refs = []
                for records in polled.values():
                    for rec in records:
                        cmd = admin_pb2.ForgetCommand()
                        try:
                            cmd.ParseFromString(rec.value or b"")
                        except Exception:
                            log.warning("undecodable user-forget command ignored", extra={"offset": rec.offset})
                            continue
                        if cmd.user_ref:
                            refs.append(cmd.user_ref)
                if refs:
                    self.apply(refs)
            except KafkaError:
                log.warning("user-forget consumer error; retrying", exc_info=True)
                self._consumer = None
                self._stop.wait(1.0)
            except Exception:
                log.exception("applying a forget command failed; the stored list is re-read")
                self._stop.wait(1.0)
            self._maybe_refresh()
            self._run_second_pass()

    def _run_second_pass(self) -> None:
        now = time.monotonic()
        due = [u for t, u in self._second_pass if t <= now]
        if not due:
            return
        try:
            for user in due:
                # The state has no row of theirs any more; this runs its forget hooks again for
                # what a fold-in that started before the command may have kept since.
                self.state.forget(user)
                delete_user_keys(self.redis, user)
        except redis.RedisError:
            log.warning("second deletion of a forgotten user's keys failed; retrying", exc_info=True)
            return
        self._second_pass = [(t, u) for t, u in self._second_pass if t > now]

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < self.refresh_s:
            return
        self._refreshed_at = now
        try:
            self.apply(self.store.all_refs())
        except Exception:
            log.warning("reading the forgotten-users list failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                self._consumer.close()
