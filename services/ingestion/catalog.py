"""Catalog intake: items into MongoDB (photo in GridFS) and an ``item-updates`` message each.

Order matters for "nothing silently lost": MongoDB first (idempotent upsert by
item id), then the item-updates message, and only then the answer. If the
broker fails, the caller gets UNAVAILABLE and retries; the retry rewrites the
same document and republishes, which the style worker tolerates.

An upsert without an image keeps the stored photo (metadata-only feeds are
common); a new photo replaces the old GridFS file and drops the stale style
embedding so nobody ranks by the look of a photo that is gone.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import gridfs
import grpc
from bson import ObjectId
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import PyMongoError
from stylerec.v1 import common_pb2, ingestion_pb2

from libs.common.kafka import ITEM_UPDATES, now_timestamp
from libs.common.stores import with_retries
from services.ingestion import metrics
from services.ingestion.config import IngestionSettings
from services.ingestion.events import DependencyUnavailable, RequestRejected
from services.ingestion.images import CheckedImage, ImageError, check_image, fetch_image
from services.ingestion.publisher import BrokerUnavailable, EventPublisher
from services.ingestion.validation import ItemLimits, check_id, validate_item

log = logging.getLogger(__name__)


# The style worker's fields describe the old photo; a new photo makes them wrong until it re-embeds.
STALE_ON_NEW_PHOTO = ("style_embedding", "style_embedding_raw", "style_embedding_ref", "style_embedded_at")


class ItemNotFound(LookupError):
    pass


@dataclass
class _Staged:
    """What one call will write: Mongo ops, item-updates, GridFS files it created or replaces."""

    ops: list[UpdateOne] = field(default_factory=list)
    updates: list[common_pb2.ItemUpdate] = field(default_factory=list)
    new_refs: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


class ItemCatalog:
    def __init__(self, settings: IngestionSettings, db: Database, publisher: EventPublisher) -> None:
        self.settings = settings
        self.db = db
        self.items = db[settings.items_collection]
        self.fs = gridfs.GridFS(db)
        self.publisher = publisher
        self.limits = ItemLimits(
            max_id_length=settings.max_id_length,
            max_title_length=settings.max_title_length,
            max_field_length=settings.max_field_length,
            max_attributes=settings.max_attributes,
            max_attribute_length=settings.max_attribute_length,
            max_price=settings.max_price,
            max_image_bytes=settings.max_image_bytes,
        )
        self._fetchers = ThreadPoolExecutor(settings.image_fetch_workers, thread_name_prefix="image-fetch")

    def close(self) -> None:
        self._fetchers.shutdown(wait=False, cancel_futures=True)

    # ---------- upsert ----------
    def check_request(self, request: ingestion_pb2.UpsertItemsRequest) -> None:
        n = len(request.items)
        if n > self.settings.max_batch_items:
            metrics.REQUEST_REJECTS.labels("UpsertItems", "too_many").inc()
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {n} items exceeds the maximum of {self.settings.max_batch_items}",
                [("items", f"at most {self.settings.max_batch_items} items per call")],
                "too_many",
            )
        size = request.ByteSize()
        if size > self.settings.max_request_bytes:
            metrics.REQUEST_REJECTS.labels("UpsertItems", "too_large").inc()
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes exceeds the maximum of {self.settings.max_request_bytes}",
                [("items", "split the batch or send image URLs")],
                "too_large",
            )

    def _image_of(self, item: common_pb2.Item) -> CheckedImage | None:
        if not item.HasField("image") or item.image.WhichOneof("source") is None:
            return None
        s = self.settings
        if item.image.WhichOneof("source") == "url":
            data = fetch_image(
                item.image.url,
                max_bytes=s.max_image_bytes,
                timeout_s=s.image_fetch_timeout_s,
                allow_private=s.image_fetch_allow_private,
            )
        else:
            data = item.image.data
        return check_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def upsert(self, request: ingestion_pb2.UpsertItemsRequest) -> ingestion_pb2.UpsertItemsResponse:
        self.check_request(request)
        resp = ingestion_pb2.UpsertItemsResponse()
        n = len(request.items)
        first_index: dict[str, int] = {}
        valid: list[tuple[int, common_pb2.Item]] = []
        for i, item in enumerate(request.items):
            reason = validate_item(item, self.limits)
            if reason is None and item.item_id in first_index:
                reason = f"item_id repeated in this request (first at index {first_index[item.item_id]})"
            if reason:
                resp.rejected.add(index=i, reason=reason, item_id=item.item_id)
                continue
            first_index[item.item_id] = i
            valid.append((i, item))
        if valid:
            try:
                staged = self._stage(valid, resp)
            except PyMongoError as exc:
                metrics.ITEMS.labels("failed").inc(len(valid))
                log.warning("catalog write failed", extra={"error": str(exc), "items": len(valid)})
                raise DependencyUnavailable(f"catalog store unavailable: {type(exc).__name__}", 1.0) from exc
        else:
            staged = _Staged()
        if resp.rejected:
            metrics.ITEMS.labels("rejected").inc(len(resp.rejected))
        if n and not staged.ops:
            metrics.REQUEST_REJECTS.labels("UpsertItems", "all_invalid").inc()
            rejected = sorted(resp.rejected, key=lambda r: r.index)
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"all {n} items rejected; first: #{rejected[0].index}: {rejected[0].reason}",
                [(f"items[{r.index}]", r.reason) for r in rejected[:100]],
                "all_invalid",
            )
        if staged.ops:
            self._commit(staged)
            self._publish(staged.updates)
            metrics.ITEMS.labels("upserted").inc(len(staged.ops))
        resp.upserted = len(staged.ops)
        if len(resp.rejected) > 1:
            ordered = [
                ingestion_pb2.RejectedItem(index=r.index, reason=r.reason, item_id=r.item_id)
                for r in sorted(resp.rejected, key=lambda r: r.index)
            ]
            del resp.rejected[:]
            resp.rejected.extend(ordered)
        return resp

    def _stage(self, valid: list[tuple[int, common_pb2.Item]], resp: ingestion_pb2.UpsertItemsResponse) -> _Staged:
        """Fetch/check photos through a sliding window and write each to GridFS as soon as it is
        checked, so a call holds at most ``image_fetch_workers`` photos in memory at a time."""
        ids = [item.item_id for _, item in valid]
        existing = {
            d["_id"]: d
            for d in with_retries(
                lambda: list(self.items.find({"_id": {"$in": ids}}, {"image_ref": 1, "image_sha256": 1}))
            )
        }
        staged = _Staged()
        now = time.time()
        window: deque[tuple[int, common_pb2.Item, Future[CheckedImage | None]]] = deque()
        todo = iter(valid)
        try:
            while True:
                while len(window) < self.settings.image_fetch_workers:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    window.append((nxt[0], nxt[1], self._fetchers.submit(self._image_of, nxt[1])))
                if not window:
                    return staged
                i, item, fut = window.popleft()
                try:
                    image = fut.result()
                except ImageError as exc:
                    resp.rejected.add(index=i, reason=str(exc), item_id=item.item_id)
                    continue
                self._stage_one(item, image, existing.get(item.item_id, {}), now, staged)
        except BaseException:
            for _, _, fut in window:
                fut.cancel()
            self._discard(staged.new_refs)
            raise

    def _stage_one(
        self, item: common_pb2.Item, image: CheckedImage | None, old: dict[str, Any], now: float, staged: _Staged
    ) -> None:
        fields: dict[str, Any] = {
            "title": item.title,
            "category": item.category,
            "brand": item.brand,
            "price": item.price,
            "attributes": dict(item.attributes),
            "updated_at": now,
        }
        update: dict[str, Any] = {"$set": fields}
        image_ref = str(old.get("image_ref", ""))
        if image is not None:
            sha = hashlib.sha256(image.data).hexdigest()
            if sha != old.get("image_sha256") or not image_ref:
                new_ref = str(
                    self.fs.put(
                        image.data,
                        filename=f"item-{item.item_id}",
                        content_type=image.content_type,
                        metadata={"kind": "item-image", "item_id": item.item_id, "sha256": sha},
                    )
                )
                staged.new_refs.append(new_ref)
                if image_ref:
                    staged.replaced.append(image_ref)
                    update["$unset"] = dict.fromkeys(STALE_ON_NEW_PHOTO, "")
                image_ref = new_ref
            fields.update(
                image_ref=image_ref,
                image_sha256=sha,
                image_content_type=image.content_type,
                image_size=[image.width, image.height],
            )
            metrics.IMAGE_BYTES.observe(len(image.data))
        elif not old:
            fields["image_ref"] = ""
        created = item.created_at.seconds + item.created_at.nanos / 1e9 if item.HasField("created_at") else now
        update["$setOnInsert"] = {"created_at": created}
        staged.ops.append(UpdateOne({"_id": item.item_id}, update, upsert=True))
        staged.updates.append(
            common_pb2.ItemUpdate(item_id=item.item_id, image_ref=image_ref, updated_at=now_timestamp())
        )

    def _commit(self, staged: _Staged) -> None:
        """One unordered bulk upsert; photos replaced by it are deleted afterwards (best effort)."""
        try:
            with_retries(lambda: self.items.bulk_write(staged.ops, ordered=False))
        except PyMongoError as exc:
            metrics.ITEMS.labels("failed").inc(len(staged.ops))
            log.warning("catalog write failed", extra={"error": str(exc), "items": len(staged.ops)})
            self._discard(staged.new_refs)
            raise DependencyUnavailable(f"catalog store unavailable: {type(exc).__name__}", 1.0) from exc
        self._discard(staged.replaced)

    def _discard(self, refs: list[str]) -> None:
        for ref in refs:
            try:
                self.fs.delete(ObjectId(ref))
            except (PyMongoError, ValueError):
                log.warning("could not delete a photo", extra={"image_ref": ref})

    def _publish(self, updates: list[common_pb2.ItemUpdate]) -> None:
        self.publisher.admit(len(updates))
        records = [(u.item_id.encode(), u.SerializeToString()) for u in updates]
        pending = self.publisher.send(ITEM_UPDATES, records, admitted=len(records))
        result = self.publisher.wait(pending, ITEM_UPDATES)
        if result.error:
            raise BrokerUnavailable(f"item-updates not confirmed by the broker: {result.error}", 1.0)

    # ---------- read ----------
    def get(self, item_id: str, include_image: bool) -> common_pb2.Item:
        problem = check_id("item_id", item_id, self.settings.max_id_length)
        if problem:
            raise ValueError(problem)
        try:
            doc = with_retries(lambda: self.items.find_one({"_id": item_id}))
        except PyMongoError as exc:
            raise DependencyUnavailable(f"catalog store unavailable: {type(exc).__name__}", 1.0) from exc
        if doc is None:
            raise ItemNotFound(item_id)
        item = common_pb2.Item(
            item_id=item_id,
            title=str(doc.get("title", "")),
            category=str(doc.get("category", "")),
            brand=str(doc.get("brand", "")),
            price=float(doc.get("price", 0.0)),
            attributes={str(k): str(v) for k, v in (doc.get("attributes") or {}).items()},
            image_ref=str(doc.get("image_ref", "")),
        )
        if doc.get("created_at") is not None:
            item.created_at.FromNanoseconds(int(float(doc["created_at"]) * 1e9))
        if include_image and item.image_ref:
            try:
                data = self.fs.get(ObjectId(item.image_ref)).read()
            except (gridfs.errors.NoFile, ValueError) as exc:
                raise ItemNotFound(f"{item_id}: photo {item.image_ref} is missing") from exc
            except PyMongoError as exc:
                raise DependencyUnavailable(f"photo store unavailable: {type(exc).__name__}", 1.0) from exc
            item.image.data = data
            item.image.content_type = str(doc.get("image_content_type", ""))
        return item
