"""End to end over gRPC and Kafka with the real stack (broker, Redis, Mongo-protocol server, four services).

A shopper who favourites and buys art prints gets STYLE_PERSONALIZED answers whose
stylized photos the style worker eventually draws; a shopper with history but no
style evidence gets CF; a stranger gets POPULAR. The answers are then rendered as
the demo page would be, link-checked and screenshotted in headless Chromium
(kept under out/demo/e2e/).
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from PIL import Image
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc

from cli.demo.page import PageData, RecRow, ShopperView, Tile, check_page, screenshot, write_page
from cli.localstack.stack import REPO, Stack
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.e2e]
T = TypeVar("T")
E2E_OUT = REPO / "out" / "demo" / "e2e"


def poll(what: str, fn: Callable[[], T], ok: Callable[[T], bool], timeout_s: float, every_s: float = 0.5) -> T:
    end = time.monotonic() + timeout_s
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value}")
        time.sleep(every_s)


def picture(name: str, fallback: tuple[int, int, int], size: int = 160) -> bytes:
    """A small JPEG: the real style/product image when ../shared/data exists, else a generated pattern."""
    for folder in ("styles", "products"):
        for ext in (".jpg", ".png"):
            path = SHARED_DATA / "images" / folder / f"{name}{ext}"
            if path.exists():
                img = Image.open(path).convert("RGB")
                break
        else:
            continue
        break
    else:
        yy, xx = np.mgrid[0:size, 0:size]
        arr = np.zeros((size, size, 3), np.uint8)
        arr[:] = fallback
        arr[(np.sin(xx / 5.0) + np.cos(yy / 7.0)) > 0.5] = (250, 250, 240)
        img = Image.fromarray(arr)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def event(user: str, item: str, etype: int, ts: float) -> common_pb2.Event:
    e = common_pb2.Event(user_id=user, item_id=item, type=etype)  # type: ignore[arg-type]
    e.timestamp.FromNanoseconds(int(ts * 1e9))
    return e


def test_style_cf_popular_end_to_end_and_demo_page(stack: Stack, unique: str) -> None:
    ing_ch = grpc.insecure_channel(stack.addr_of("ingestion"))
    gw_ch = grpc.insecure_channel(stack.addr_of("gateway"))
    ing = ingestion_pb2_grpc.IngestionServiceStub(ing_ch)
    gw = gateway_pb2_grpc.GatewayServiceStub(gw_ch)
    try:
        starry, scream = f"print-starry-{unique}", f"print-scream-{unique}"
        coffee, apple = f"photo-coffee-{unique}", f"photo-apple-{unique}"
        mug, card = f"gift-mug-{unique}", f"gift-card-{unique}"
        photo_cat = f"photo-{unique}"  # a shelf only this test's items are on, whatever else the session stored
        pictures = {
            starry: ("Art print: The Starry Night", "art-print", picture("starry_night", (20, 40, 160))),
            scream: ("Art print: The Scream", "art-print", picture("the_scream", (200, 90, 20))),
            coffee: ("Photo print: Coffee", photo_cat, picture("coffee", (120, 70, 30))),
            apple: ("Photo print: Apple", photo_cat, picture("apple", (30, 160, 40))),
        }
        items = [
            common_pb2.Item(
                item_id=i,
                title=t,
                category=c,
                price=20.0,
                image=common_pb2.Image(data=data, content_type="image/jpeg"),
            )
            for i, (t, c, data) in pictures.items()
        ]
        items += [
            common_pb2.Item(item_id=mug, title="Heart mug", category="gift", price=3.5),
            common_pb2.Item(item_id=card, title="Birthday card", category="gift", price=0.9),
        ]
        up = ing.UpsertItems(ingestion_pb2.UpsertItemsRequest(items=items), timeout=30)
        assert up.upserted == len(items), up.rejected

        # The style worker embeds every new photo (item-updates → style-jobs EMBED).
        def embedded() -> list[str]:
            got = []
            for i in pictures:
                resp = gw.GetSimilarItems(
                    gateway_pb2.GetSimilarItemsRequest(item_id=i, k=1, mode=gateway_pb2.SIMILARITY_STYLE), timeout=5
                )
                if "no style embedding" not in resp.degraded_reason:
                    got.append(i)
            return got

        poll("the style worker to embed the photos", embedded, lambda got: len(got) == len(pictures), 120, 1.0)

        lover, gifter, stranger = f"lover-{unique}", f"gifter-{unique}", f"stranger-{unique}"
        now = time.time()
        events = [
            event(lover, starry, common_pb2.FAVORITE, now - 50),
            event(lover, starry, common_pb2.ADD_TO_CART, now - 40),
            event(lover, starry, common_pb2.PURCHASE, now - 30),
            event(lover, scream, common_pb2.PURCHASE, now - 20),
            event(lover, mug, common_pb2.PURCHASE, now - 15),
            event(gifter, mug, common_pb2.PURCHASE, now - 12),
            event(gifter, card, common_pb2.PURCHASE, now - 11),
            # Other shoppers buy the photo prints, so popularity and CF know them.
            *[
                event(f"visitor-{n}-{unique}", it, common_pb2.PURCHASE, now - 10 + n)
                for n, it in enumerate([coffee, apple, card, coffee, apple, mug])
            ],
        ]
        resp = ing.IngestEvents(ingestion_pb2.IngestEventsRequest(events=events), timeout=30)
        assert resp.accepted == len(events), resp.rejected

        def ask(user: str, **kw: object) -> gateway_pb2.GetRecommendationsResponse:
            return gw.GetRecommendations(gateway_pb2.GetRecommendationsRequest(user_id=user, k=6, **kw), timeout=5)  # type: ignore[arg-type]

        style = poll(
            "a STYLE_PERSONALIZED answer for the print lover",
            lambda: ask(lover, want_stylized=True, filters=gateway_pb2.Filters(category=photo_cat)),
            lambda r: r.strategy == gateway_pb2.STYLE_PERSONALIZED and len(r.items) > 0,
            60,
        )
        assert style.anchor_item_id == starry  # the most-weighted print: favourite + cart + purchase
        assert style.style_confidence >= 0.5 and style.style_lambda > 0
        assert {it.item_id for it in style.items} <= {coffee, apple}
        for it in style.items:
            assert it.final_score == pytest.approx(
                (1 - style.style_lambda) * it.cf_score + style.style_lambda * it.style_affinity, abs=1e-6
            )
            assert it.stylized_status in (gateway_pb2.STYLIZED_PENDING, gateway_pb2.STYLIZED_READY)

        ready = poll(
            "the stylized photos to arrive",
            lambda: ask(lover, want_stylized=True, filters=gateway_pb2.Filters(category=photo_cat)),
            lambda r: all(it.stylized_status == gateway_pb2.STYLIZED_READY for it in r.items),
            180,
            1.0,
        )
        target = ready.items[0]
        chunks = list(
            gw.GetStylizedImage(gateway_pb2.GetStylizedImageRequest(user_id=lover, item_id=target.item_id), timeout=10)
        )
        data = b"".join(c.data for c in chunks)
        assert chunks[0].total_size == len(data) > 0
        Image.open(io.BytesIO(data)).verify()  # a real, decodable picture

        # Similar items on the real stack: style neighbours from the embeddings; CF and BLEND answer
        # (degraded if scoring has no trained model yet) without an RPC error.
        by_style = gw.GetSimilarItems(
            gateway_pb2.GetSimilarItemsRequest(item_id=starry, k=200, mode=gateway_pb2.SIMILARITY_STYLE), timeout=5
        )
        assert {scream, coffee, apple} <= {s.item_id for s in by_style.items} and starry not in [
            s.item_id for s in by_style.items
        ]
        for mode in (gateway_pb2.SIMILARITY_CF, gateway_pb2.SIMILARITY_BLEND):
            gw.GetSimilarItems(gateway_pb2.GetSimilarItemsRequest(item_id=starry, k=5, mode=mode), timeout=5)

        cf = poll("a CF answer for the gift buyer", lambda: ask(gifter), lambda r: r.strategy == gateway_pb2.CF, 60)
        assert not cf.degraded, cf.degraded_reason  # scoring's answers above did not open its breaker
        assert cf.model_version and mug not in [it.item_id for it in cf.items]
        # Scoring refreshes the popularity list periodically: poll until it names items.
        popular = poll("a POPULAR answer with items", lambda: ask(stranger), lambda r: len(r.items) > 0, 60)
        assert popular.strategy == gateway_pb2.POPULAR and not popular.degraded

        # The demo page for these answers: links to files that exist, stylized images shown, rendered.
        shutil.rmtree(E2E_OUT, ignore_errors=True)
        (E2E_OUT / "img").mkdir(parents=True)
        rows = []
        for rank, it in enumerate(ready.items, 1):
            orig = E2E_OUT / "img" / f"orig-{it.item_id}.jpg"
            orig.write_bytes(pictures[it.item_id][2])
            styl_chunks = gw.GetStylizedImage(
                gateway_pb2.GetStylizedImageRequest(user_id=lover, item_id=it.item_id), timeout=10
            )
            styl = E2E_OUT / "img" / f"styl-{it.item_id}.jpg"
            styl.write_bytes(b"".join(c.data for c in styl_chunks))
            rows.append(
                RecRow(
                    rank,
                    it.item_id,
                    it.title,
                    it.category,
                    it.price,
                    it.cf_score,
                    it.style_affinity,
                    it.final_score,
                    f"img/{orig.name}",
                    f"img/{styl.name}",
                    "ready",
                )
            )
        anchor_path = E2E_OUT / "img" / "anchor.jpg"
        anchor_path.write_bytes(pictures[starry][2])
        view = ShopperView(
            name="Print lover (e2e test)",
            user_id=lover,
            story="favourited and bought The Starry Night",
            expect="STYLE_PERSONALIZED",
            strategy="STYLE_PERSONALIZED",
            model_version=ready.model_version,
            degraded=ready.degraded,
            degraded_reason=ready.degraded_reason,
            confidence=ready.style_confidence,
            style_lambda=ready.style_lambda,
            anchor=Tile(starry, pictures[starry][0], "img/anchor.jpg"),
            history=[Tile(starry, pictures[starry][0], "img/anchor.jpg", "favorite")],
            recs=rows,
        )
        page = write_page(E2E_OUT, PageData("StyleRec e2e page (SYNTHETIC test shoppers)", ["test data"], [], [view]))
        problems, shown = check_page(page)
        assert not problems and shown == len(rows) > 0
        why_not = screenshot(page, E2E_OUT / "screenshot.png", height=900)
        assert why_not == "", why_not
        assert (E2E_OUT / "screenshot.png").stat().st_size > 5000
    finally:
        ing_ch.close()
        gw_ch.close()


def test_page_check_catches_missing_files_and_outside_links(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.jpg").write_bytes(b"\xff\xd8data")
    (tmp_path / "index.html").write_text(
        '<img class="stylized" src="img/ok.jpg"><img src="img/missing.jpg">'
        '<img src="http://example.com/x.jpg"><a href="/etc/passwd">x</a>'
    )
    problems, shown = check_page(tmp_path / "index.html")
    assert shown == 1
    assert any("missing.jpg" in p for p in problems)
    assert any("example.com" in p for p in problems) and any("/etc/passwd" in p for p in problems)
    assert check_page(tmp_path / "nope.html")[0]
