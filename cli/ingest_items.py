"""`stylerec ingest items FILE.jsonl [--images DIR]`: push catalog items to the ingestion service.

One JSON object per line::

    {"item_id": "sku-1", "title": "Red dress", "category": "dresses", "brand": "Acme",
     "price": 49.9, "attributes": {"color": "red"}, "image": "sku-1.jpg"}

``image`` is a file name under ``--images`` (default: the file's folder) or an
http(s) URL the service fetches. Problems with the file itself (bad JSON, a
missing photo, a path outside the images folder) stop the command with exit
code 2 and the line number; problems the service finds in an item are listed
per item, like ``ingest events`` does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from stylerec.v1 import common_pb2, ingestion_pb2, ingestion_pb2_grpc

from cli.errors import UsageError
from libs.common.channels import describe_rpc_error, env_channel
from libs.common.errors import violations_of

MAX_CHUNK_ITEMS = 100
MAX_CHUNK_BYTES = 8 * 1024 * 1024
MAX_LOCAL_IMAGE_BYTES = 64 * 1024 * 1024
FIELDS = {"item_id", "title", "category", "brand", "price", "attributes", "image", "image_url", "created_at"}


class ItemFileError(ValueError):
    pass


def register_items(isub: Any) -> None:
    """Adds ``items`` under the existing ``stylerec ingest`` parser."""
    p = isub.add_parser("items", help="JSONL catalog items (item_id,title,category,brand,price,attributes,image)")
    p.add_argument("file", type=Path)
    p.add_argument("--images", type=Path, help="folder holding the photos named in `image` (default: file's folder)")
    p.add_argument("--addr", help="ingestion host:port (default: from the running stack)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest_items)


def _image(value: Any, images_dir: Path, where: str) -> common_pb2.Image:
    if not isinstance(value, str) or not value.strip():
        raise ItemFileError(f"{where}: image must be a file name or an http(s) URL")
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return common_pb2.Image(url=value)
    if "://" in value:
        raise ItemFileError(f"{where}: image URL must be http:// or https://")
    root = images_dir.resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise ItemFileError(f"{where}: image {value!r} is outside the images folder {root}")
    if not path.is_file():
        raise ItemFileError(f"{where}: image file {path} not found")
    if path.stat().st_size > MAX_LOCAL_IMAGE_BYTES:
        raise ItemFileError(f"{where}: image file {path} is larger than {MAX_LOCAL_IMAGE_BYTES} bytes")
    return common_pb2.Image(data=path.read_bytes())


def to_item(row: dict[str, Any], images_dir: Path, where: str) -> common_pb2.Item:
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise ItemFileError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
    item = common_pb2.Item()
    for name in ("item_id", "title", "category", "brand"):
        value = row.get(name, "")
        if not isinstance(value, str | int):
            raise ItemFileError(f"{where}: {name} must be a string")
        setattr(item, name, str(value))
    if row.get("price") is not None:
        price = row["price"]
        if isinstance(price, bool) or not isinstance(price, int | float | str):
            raise ItemFileError(f"{where}: price must be a number")
        try:
            item.price = float(price)
        except ValueError as exc:
            raise ItemFileError(f"{where}: price {price!r} is not a number") from exc
    attrs = row.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise ItemFileError(f"{where}: attributes must be an object of strings")
    for k, v in attrs.items():
        if isinstance(v, dict | list):
            raise ItemFileError(f"{where}: attributes.{k} must be a string or number")
        item.attributes[str(k)] = str(v)
    image = row.get("image") or row.get("image_url")
    if image is not None:
        item.image.CopyFrom(_image(image, images_dir, where))
    if row.get("created_at") not in (None, ""):
        from cli.eventfile import parse_timestamp

        try:
            item.created_at.FromNanoseconds(int(parse_timestamp(row["created_at"]) * 1e9))
        except ValueError as exc:
            raise ItemFileError(f"{where}: {exc}") from exc
    return item


def read_items(path: Path, images_dir: Path | None) -> Iterator[common_pb2.Item]:
    if not path.is_file():
        raise ItemFileError(f"{path}: no such file")
    images = images_dir if images_dir is not None else path.parent
    if images_dir is not None and not images_dir.is_dir():
        raise ItemFileError(f"--images {images_dir}: not a folder")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ItemFileError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ItemFileError(f"{where}: expected a JSON object")
            yield to_item(row, images, where)


def chunks(items: list[common_pb2.Item]) -> Iterator[tuple[int, list[common_pb2.Item]]]:
    """Split so each request stays far below the service's request-size limit."""
    start, size = 0, 0
    current: list[common_pb2.Item] = []
    for i, item in enumerate(items):
        n = item.ByteSize()
        if current and (len(current) >= MAX_CHUNK_ITEMS or size + n > MAX_CHUNK_BYTES):
            yield start, current
            start, current, size = i, [], 0
        current.append(item)
        size += n
    if current:
        yield start, current


def cmd_ingest_items(args: argparse.Namespace) -> int:
    from cli.client_commands import service_addr

    try:
        items = list(read_items(args.file, args.images))
    except (ItemFileError, UnicodeDecodeError) as exc:
        raise UsageError(str(exc)) from exc
    addr = service_addr("ingestion", args.addr)
    upserted = 0
    rejected: list[dict[str, Any]] = []
    with env_channel(addr) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        for start, chunk in chunks(items):
            try:
                resp = stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=chunk), timeout=120)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    found = violations_of(exc)
                    for field, reason in found:
                        index = start + int(field.split("[")[1].rstrip("]")) if field.startswith("items[") else start
                        rejected.append({"index": index, "reason": reason})
                    if not found:
                        rejected.append({"index": start, "reason": exc.details()})
                    continue
                raise UsageError(f"ingestion at {addr} failed: {describe_rpc_error(exc)}") from exc
            upserted += resp.upserted
            rejected.extend({"index": start + r.index, "item_id": r.item_id, "reason": r.reason} for r in resp.rejected)
    if args.json:
        print(json.dumps({"upserted": upserted, "rejected": len(rejected), "rejected_items": rejected[:100]}))
    else:
        print(f"upserted {upserted}  rejected {len(rejected)}")
        for r in rejected[:10]:
            print(f"  rejected {r}")
    return 0
