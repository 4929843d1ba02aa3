"""Catalog: UpsertItems / GetItem against the real service, MongoDB/GridFS and the broker."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gridfs
import grpc
import pytest
from bson import ObjectId
from PIL import Image
from pymongo.database import Database
from stylerec.v1 import common_pb2, ingestion_pb2

from cli.main import main as cli_main
from libs.common.errors import violations_of
from libs.common.kafka import ITEM_UPDATES
from tests.conftest import SHARED_DATA
from tests.ingestion.conftest import Ingestion, read_records

pytestmark = pytest.mark.integration
PRODUCT_IMAGES = SHARED_DATA / "images" / "products"


def photo(color: tuple[int, int, int] = (180, 30, 30), size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A generated (synthetic) product photo."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def real_photo() -> bytes:
    """A real product photo from ../shared/data when present (small enough for the test limit), else synthetic."""
    if PRODUCT_IMAGES.is_dir():
        for path in sorted(PRODUCT_IMAGES.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.stat().st_size < 100 * 1024:
                return path.read_bytes()
    return photo((10, 120, 200), (80, 80), "PNG")


def item(item_id: str, **kw: Any) -> common_pb2.Item:
    it = common_pb2.Item(item_id=item_id, title=f"Dress {item_id}", category="dresses", brand="Acme", price=49.5)
    it.attributes["color"] = "red"
    for k, v in kw.items():
        if k == "data":
            it.image.data = v
        elif k == "url":
            it.image.url = v
        elif k == "attributes":
            it.attributes.clear()
            it.attributes.update(v)
        else:
            setattr(it, k, v)
    return it


class _Images(BaseHTTPRequestHandler):
    body = photo()

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        body = b"x" * (200 * 1024) if "huge" in self.path else self.body
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if not self.path.startswith("/nolength"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _upsert(ing: Ingestion, items: list[common_pb2.Item]) -> ingestion_pb2.UpsertItemsResponse:
    with ing.channel() as ch:
        return ing.stub(ch).UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items), timeout=30)


def _get(ing: Ingestion, item_id: str, include_image: bool = False) -> common_pb2.Item:
    with ing.channel() as ch:
        return ing.stub(ch).GetItem(
            ingestion_pb2.GetItemRequest(item_id=item_id, include_image=include_image), timeout=10
        )


def test_upsert_with_bytes_and_url_then_get(
    ing: Ingestion, mongo_db: Database[Any], unique: str, image_server: str
) -> None:
    data = real_photo()
    a, b, c = f"sku-{unique}-a", f"sku-{unique}-b", f"sku-{unique}-c"
    resp = _upsert(ing, [item(a, data=data), item(b, url=f"{image_server}/photo.jpg"), item(c)])
    assert (resp.upserted, list(resp.rejected)) == (3, [])
    got = _get(ing, a, include_image=True)
    assert (got.title, got.category, got.brand, got.price, dict(got.attributes)) == (
        f"Dress {a}",
        "dresses",
        "Acme",
        49.5,
        {"color": "red"},
    )
    assert got.image_ref and got.image.data == data and got.image.content_type.startswith("image/")
    assert got.HasField("created_at")
    fetched = _get(ing, b, include_image=True)
    assert fetched.image.data == _Images.body and fetched.image.content_type == "image/jpeg"
    assert _get(ing, c).image_ref == ""
    assert not _get(ing, a).image.data  # photo bytes only on request
    doc = mongo_db["items"].find_one({"_id": a})
    assert doc is not None and doc["image_ref"] == got.image_ref
    meta = mongo_db["fs.files"].find_one({"_id": ObjectId(got.image_ref)})
    assert meta is not None and meta["metadata"]["kind"] == "item-image" and meta["metadata"]["item_id"] == a
    # Every upserted item was announced on item-updates, keyed by item id, with its photo reference.
    updates = {}
    for r in read_records(ing.stack.kafka_bootstrap, ITEM_UPDATES, idle_s=1.0):
        u = common_pb2.ItemUpdate.FromString(r.value)
        if u.item_id in (a, b, c):
            assert r.key == u.item_id.encode()
            updates[u.item_id] = u.image_ref
    assert updates == {a: got.image_ref, b: fetched.image_ref, c: ""}


def test_metadata_update_keeps_photo_and_new_photo_replaces_it(
    ing: Ingestion, mongo_db: Database[Any], unique: str
) -> None:
    sku = f"sku-{unique}"
    assert _upsert(ing, [item(sku, data=photo((1, 2, 3)))]).upserted == 1
    first = _get(ing, sku)
    mongo_db["items"].update_one({"_id": sku}, {"$set": {"style_embedding": [0.5] * 4}})
    assert _upsert(ing, [item(sku, title="Renamed", price=10.0)]).upserted == 1
    renamed = _get(ing, sku)
    assert (renamed.title, renamed.price, renamed.image_ref) == ("Renamed", 10.0, first.image_ref)
    assert renamed.created_at == first.created_at
    # Same photo again: no new file.
    assert _upsert(ing, [item(sku, data=photo((1, 2, 3)))]).upserted == 1
    assert _get(ing, sku).image_ref == first.image_ref
    # A different photo: new file, the old one is deleted and the stale style embedding dropped.
    assert _upsert(ing, [item(sku, data=photo((200, 200, 0)))]).upserted == 1
    replaced = _get(ing, sku)
    assert replaced.image_ref != first.image_ref
    fs = gridfs.GridFS(mongo_db)
    assert not fs.exists(ObjectId(first.image_ref)) and fs.exists(ObjectId(replaced.image_ref))
    doc = mongo_db["items"].find_one({"_id": sku})
    # The session stack's style worker may already have embedded the new photo; what must be
    # gone is the stale vector of the old one.
    assert doc is not None and doc.get("style_embedding") != [0.5] * 4


def _bad_items(unique: str, server: str) -> list[tuple[common_pb2.Item, str]]:
    return [
        (item(""), "item_id is required"),
        (item(f"x {unique}"), "item_id has characters outside"),
        (item(f"t-{unique}", title=""), "title is required"),
        (item(f"p-{unique}", price=-5.0), "price must be"),
        (item(f"n-{unique}", price=float("nan")), "price must be"),
        (item(f"a-{unique}", attributes={f"k{i}": "v" for i in range(70)}), "more than 64"),
        (item(f"r-{unique}", image_ref="abc"), "image_ref is set by the catalog"),
        (item(f"big-{unique}", data=b"\xff" * 125_000), "larger than"),
        (item(f"junk-{unique}", data=b"GIF89a-not-really"), "not a readable"),
        (item(f"px-{unique}", data=photo(size=(2500, 2000), fmt="JPEG")), "exceeds 4000000 pixels"),
        (item(f"scheme-{unique}", url="file:///etc/passwd"), "http:// or https://"),
        (item(f"404-{unique}", url=f"{server}/missing.jpg"), "HTTP 404"),
        (item(f"huge-{unique}", url=f"{server}/huge.jpg"), "Content-Length"),
        (item(f"huge2-{unique}", url=f"{server}/nolength-huge.jpg"), "body exceeds"),
        (item(f"slow-{unique}", url=f"{server}/slow.jpg"), "1.5s"),
        (item(f"dead-{unique}", url="http://127.0.0.1:9/a.jpg"), "fetch failed"),
    ]


def test_bad_items_are_rejected_per_item(ing: Ingestion, unique: str, image_server: str) -> None:
    cases = _bad_items(unique, image_server)
    good = item(f"ok-{unique}")
    resp = _upsert(ing, [good] + [c for c, _ in cases] + [item(f"ok-{unique}")])
    reasons = {r.index: r.reason for r in resp.rejected}
    assert resp.upserted == 1, [(i, cases[i - 1][1]) for i in range(1, len(cases) + 1) if i not in reasons]
    for i, (_, expected) in enumerate(cases, start=1):
        assert expected in reasons.get(i, ""), (i, expected, reasons.get(i))
    assert "repeated in this request" in reasons[len(cases) + 1]
    with pytest.raises(grpc.RpcError) as err:
        _get(ing, f"junk-{unique}")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_whole_request_item_violations(ing: Ingestion, unique: str) -> None:
    with ing.channel() as ch:
        stub = ing.stub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=[item(f"m{i}") for i in range(21)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum of 20" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=[item(""), item("a b")]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations_of(err.value)] == ["items[0]", "items[1]"]
        big = [item(f"b{i}-{unique}", data=b"\xff" * 200_000) for i in range(2)]
        with pytest.raises(grpc.RpcError) as err:
            stub.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=big), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            stub.GetItem(ingestion_pb2.GetItemRequest(item_id="bad id"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------- CLI: `stylerec ingest items` ----------
def test_cli_ingest_items_with_images_dir(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str], unique: str
) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.jpg").write_bytes(photo())
    (images / "junk.jpg").write_bytes(b"not an image")
    rows = [
        {"item_id": f"cli-{unique}-1", "title": "Shirt", "category": "tops", "price": "19.9", "image": "a.jpg"},
        {"item_id": f"cli-{unique}-2", "title": "Skirt", "attributes": {"size": 38}},
        {"item_id": f"cli-{unique}-3", "title": "Broken", "image": "junk.jpg"},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # One item refused by the service: exit 1 (bulk ingest, docs/ingestion.md).
    assert cli_main(["ingest", "items", str(path), "--images", str(images), "--addr", ing.addr, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["upserted"], out["rejected"]) == (2, 1)
    assert out["rejected_items"][0]["index"] == 2 and "not a readable" in out["rejected_items"][0]["reason"]
    got = _get(ing, f"cli-{unique}-1", include_image=True)
    assert got.price == pytest.approx(19.9) and got.image.data == photo()
    assert dict(_get(ing, f"cli-{unique}-2").attributes) == {"size": "38"}


def test_cli_ingest_items_sends_the_readable_rows(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str], unique: str
) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(f'{{"item_id": "ok-{unique}", "title": "t"}}\n{{broken\n')
    assert cli_main(["ingest", "items", str(path), "--addr", ing.addr]) == 1
    out = capsys.readouterr().out
    assert "upserted 1" in out and f"{path}:2: not valid JSON" in out


# A file without one readable row cannot be used at all: exit 2, the first bad line named.
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["a", "b"]\n', "expected a JSON object"),
        ('{"item_id": "a", "title": "t", "image": "nope.jpg"}\n', "not found"),
        ('{"item_id": "a", "title": "t", "image": "../../etc/passwd"}\n', "outside the images folder"),
        ('{"item_id": "a", "title": "t", "price": "cheap"}\n', "is not a number"),
        ('{"item_id": "a", "title": "t", "colour": "red"}\n', "unknown field"),
        ('{"item_id": "a", "title": "t", "image": "ftp://x/y.jpg"}\n', "http:// or https://"),
    ],
)
def test_cli_ingest_items_bad_files_exit_2(
    ing: Ingestion, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(content)
    assert cli_main(["ingest", "items", str(path), "--addr", ing.addr]) == 2
    assert message in capsys.readouterr().err


def test_cli_ingest_items_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["ingest", "items", str(tmp_path / "none.jsonl"), "--addr", "127.0.0.1:1"]) == 2
    assert "no such file" in capsys.readouterr().err
