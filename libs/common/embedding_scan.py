"""When a full scan of the item style embeddings can be skipped.

Two readers keep something built from every ``keys.item_embedding``: the gateway's embedding
index and scoring's catalog centroid. Finding those keys is a SCAN of the whole keyspace, which
grows with the shop's users and events, not with the catalog. Every embedding writer increments
``keys.item_embeddings_version``, so a reader that remembers the version it saw before its last
scan knows whether another scan could find anything new.
"""

from __future__ import annotations

import time


class EmbeddingScanGate:
    """The version seen before the last scan, and when that scan started.

    Read the version *before* scanning and pass that value to :meth:`scanned`: a write that
    lands during the scan moves the version again, so the next check scans once more instead of
    missing it.
    """

    def __init__(self) -> None:
        self._stamp: bytes | str | None = None
        self._at = float("-inf")

    def unchanged(self, stamp: bytes | str | None, max_age_s: float) -> bool:
        """True when no embedding was written or deleted since the last scan, and that scan is
        younger than ``max_age_s`` (the bound for a writer that forgot to increment)."""
        return stamp == self._stamp and time.monotonic() - self._at < max_age_s

    def scanned(self, stamp: bytes | str | None, started_at: float) -> None:
        self._stamp, self._at = stamp, started_at

    def forget(self) -> None:
        """The next check scans whatever the version says."""
        self._at = float("-inf")
