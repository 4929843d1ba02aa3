"""`stylerec ingest items FILE.jsonl [--images DIR]`: push catalog items to the ingestion service.

One JSON object per line::

    {"item_id": "sku-1", "title": "Red dress", "category": "dresses", "brand": "Acme",
     "price": 49.9, "attributes": {"color": "red"}, "image": "sku-1.jpg"}

``image`` is a file name under ``--images`` (default: the file's folder) or an
http(s) URL the service fetches. Like ``ingest events`` it is a bulk loader:
a row that cannot be read (bad JSON, an unknown field, a missing photo, a
path outside the images folder) is a reject with its line number and every
other item is still sent; the items the service refuses are listed the same
way. Only an unusable file (missing, not JSONL, not one readable row, no
``--images`` folder) stops the command with exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from cli.client.addresses import service_addr
from cli.client.bulk_ingest import (
    add_bulk_options,
    batch_refused,
    check_bulk_args,
    finish,
    refused_outcome,
    rpc_failure,
)
from cli.client.eventfile import (
    BulkReport,
    EventFileError,
    Outcome,
    RejectsWriter,
    Row,
    check_all,
    count_lines,
    jsonl_rows,
    require_readable,
    run_bulk,
    sniff,
)
from cli.errors import UsageError
from libs.common.channels import env_channel

MAX_CHUNK_ITEMS = 100
# The service's default max_batch_items.
MAX_BATCH_ITEMS = 500
MAX_CHUNK_BYTES = 8 * 1024 * 1024
MAX_LOCAL_IMAGE_BYTES = 64 * 1024 * 1024
FIELDS = {"item_id", "title", "category", "brand", "price", "attributes", "image", "image_url", "created_at"}


class ItemFileError(ValueError):
    pass


def register_items(isub: Any) -> None:
    """Adds ``items`` under the existing ``stylerec ingest`` parser."""
    p = isub.add_parser(
        "items",
        help="JSONL catalog items (item_id,title,category,brand,price,attributes,image)",
        description="Sends every readable item in batches; unreadable rows and the items the service refuses are "
        "listed with their line numbers. Exit 0: all stored; 1: some rows rejected (or the run stopped early); "
        "2: the file cannot be used at all.",
    )
    p.add_argument("file", type=Path)
    p.add_argument("--images", type=Path, help="folder holding the photos named in `image` (default: file's folder)")
    add_bulk_options(p, default_batch=MAX_CHUNK_ITEMS, max_batch=MAX_BATCH_ITEMS)
    p.set_defaults(func=cmd_ingest_items)


def _image(value: Any, images_dir: Path) -> common_pb2.Image:
    if not isinstance(value, str) or not value.strip():
        raise ItemFileError("image must be a file name or an http(s) URL")
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return common_pb2.Image(url=value)
    if "://" in value:
        raise ItemFileError("image URL must be http:// or https://")
    root = images_dir.resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise ItemFileError(f"image {value!r} is outside the images folder {root}")
    if not path.is_file():
        raise ItemFileError(f"image file {path} not found")
    if path.stat().st_size > MAX_LOCAL_IMAGE_BYTES:
        raise ItemFileError(f"image file {path} is larger than {MAX_LOCAL_IMAGE_BYTES} bytes")
    return common_pb2.Image(data=path.read_bytes())


def to_item(row: dict[str, Any], images_dir: Path) -> common_pb2.Item:
    """One item from a JSONL row; ItemFileError says which field is wrong."""
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise ItemFileError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
    item = common_pb2.Item()
    for name in ("item_id", "title", "category", "brand"):
        value = row.get(name, "")
        if not isinstance(value, str | int):
            raise ItemFileError(f"{name} must be a string")
        setattr(item, name, str(value))
    if row.get("price") is not None:
        price = row["price"]
        if isinstance(price, bool) or not isinstance(price, int | float | str):
            raise ItemFileError("price must be a number")
        try:
            item.price = float(price)
        except ValueError as exc:
            raise ItemFileError(f"price {price!r} is not a number") from exc
    attrs = row.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise ItemFileError("attributes must be an object of strings")
    for k, v in attrs.items():
        if isinstance(v, dict | list):
            raise ItemFileError(f"attributes.{k} must be a string or number")
        item.attributes[str(k)] = str(v)
    image = row.get("image") or row.get("image_url")
    if image is not None:
        item.image.CopyFrom(_image(image, images_dir))
    if row.get("created_at") not in (None, ""):
        from cli.client.eventfile import parse_timestamp

        try:
            item.created_at.FromNanoseconds(int(parse_timestamp(row["created_at"]) * 1e9))
        except ValueError as exc:
            raise ItemFileError(str(exc)) from exc
    return item


def item_rows(path: Path, images_dir: Path | None) -> Iterator[Row[common_pb2.Item]]:
    """Every data row of an items file, readable or not; EventFileError when the file is unusable."""
    if images_dir is not None and not images_dir.is_dir():
        raise EventFileError(f"--images {images_dir}: not a folder")
    if sniff(path) != "jsonl":
        raise EventFileError(f"{path}: items must be JSONL (one JSON object per line)")
    images = images_dir if images_dir is not None else path.parent
    return jsonl_rows(path, lambda row: to_item(row, images))


def read_items(path: Path, images_dir: Path | None) -> Iterator[common_pb2.Item]:
    """All-or-nothing reading: ItemFileError ``path:line: reason`` at the first bad row."""
    try:
        rows = item_rows(path, images_dir)
    except EventFileError as exc:
        raise ItemFileError(str(exc)) from exc
    for row in rows:
        if row.error is not None or row.value is None:
            raise ItemFileError(f"{path}:{row.line}: {row.error}")
        yield row.value


def send_items(stub: ingestion_pb2_grpc.IngestionServiceStub, addr: str) -> Callable[[list[common_pb2.Item]], Outcome]:
    """One UpsertItems call per batch (an upsert: sending an item again is harmless)."""

    def send(items: list[common_pb2.Item]) -> Outcome:
        try:
            resp = stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items), timeout=120)
        except grpc.RpcError as exc:
            if batch_refused(exc):
                return refused_outcome(exc, len(items), "items")
            raise rpc_failure(exc, addr) from exc
        return Outcome(accepted=resp.upserted, rejected={r.index: r.reason for r in resp.rejected})

    return send


def cmd_ingest_items(args: argparse.Namespace) -> int:
    from services.ingestion.validation import ItemLimits, validate_item

    check_bulk_args(args, MAX_BATCH_ITEMS)
    path: Path = args.file

    def rows() -> Iterator[Row[common_pb2.Item]]:
        return item_rows(path, args.images)

    try:
        rows()  # the file-level checks run here, before any row is read
        require_readable(path, (r for r in rows() if r.line >= args.from_line))
        rejects = RejectsWriter(args.rejects)
    except EventFileError as exc:
        raise UsageError(str(exc)) from exc
    total = count_lines(path)
    report = BulkReport(noun="items", accepted_word="upserted")
    if args.strict:
        limits = ItemLimits()
        if not check_all(rows(), lambda i: validate_item(i, limits), report, rejects, total, args.from_line):
            return finish_items(report, args)
        report = BulkReport(noun="items", accepted_word="upserted")
        rejects = RejectsWriter(args.rejects)
    addr = service_addr("ingestion", args.addr)
    with env_channel(addr) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        run_bulk(
            rows(),
            send_items(stub, addr),
            report,
            max_rows=args.batch_size,
            max_bytes=MAX_CHUNK_BYTES,
            size=lambda item: item.ByteSize(),
            rejects=rejects,
            total_lines=total,
            from_line=args.from_line,
            max_rate=args.max_rate,
        )
    return finish_items(report, args)


def finish_items(report: BulkReport, args: argparse.Namespace) -> int:
    """Like ingest events' summary; the JSON keeps ``rejected_items`` (index = position among the items)."""
    items = [{"index": r.index, "line": r.line, "source": r.source, "reason": r.reason} for r in report.first_rejects]
    return finish(report, args, extra={"rejected_items": items})
