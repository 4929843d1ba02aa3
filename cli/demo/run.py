"""`make demo`: the main job end to end on the embedded stack, ending in a page a person can look at.

1. start the stack (broker, Redis, Mongo-protocol server, the four services);
2. catalog: the gift shop's products (Online Retail stock codes, no photos), art prints
   (the style images) and photo prints (the product photos) through ingestion
   ``UpsertItems`` — the style worker embeds every photo it is told about;
3. events: the real Online Retail purchases (the most recent ``--limit`` of them;
   the whole file takes far longer than this demo should on a 2-core box), then
   synthetic gallery visitors and the scripted shoppers (cli/demo/shoppers.py);
4. recommendations from the gateway for each shopper (the strategy each gets is the
   paper's decision), plus a "photo prints in your style" shelf for the style lovers,
   waiting (bounded) until the style worker has drawn their stylized photos;
5. ``out/demo/index.html`` with history thumbnails, recommendations, scores and the
   original and stylized photos side by side; a link check; a headless-Chromium
   screenshot (``out/demo/screenshot.png``) when Chromium is installed;
6. the recommendations printed here too, and a short summary with the page's path.

Without ``../shared/data`` it runs on generated purchases and pictures, labelled synthetic.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import redis
from stylerec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc
from tqdm import tqdm

from cli.datasets.retail import SHARED_DATA, gift_items, load_purchases, to_events
from cli.demo.catalog import DemoPictures, load_pictures, picture_items
from cli.demo.page import OUT, PageData, RecRow, ShopperView, Tile, check_page, screenshot, write_page
from cli.demo.shoppers import gallery_visitors, scripted_shoppers, shopper_events
from cli.localstack.seeding import ingest, train_model, upsert, wait_for
from cli.localstack.stack import Stack
from libs.common import keys

DEFAULT_LIMIT = 60_000
STATUS = {v: k for k, v in gateway_pb2.StylizedStatus.items()}


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def print_recs(resp: gateway_pb2.GetRecommendationsResponse, user: str, titles: dict[str, str]) -> None:
    strategy = gateway_pb2.Strategy.Name(resp.strategy)
    extra = f", degraded: {resp.degraded_reason}" if resp.degraded else ""
    print(f"\nuser {user}: strategy {strategy}, model {resp.model_version or '-'}{extra}")
    for rank, item in enumerate(resp.items, 1):
        print(
            f"  {rank}. {item.item_id:<28} {titles.get(item.item_id, item.title)[:40]:<40} "
            f"cf {item.cf_score:.3f} style {item.style_affinity:.3f} final {item.final_score:.3f}"
            + (f"  [{STATUS.get(item.stylized_status, '')}]" if item.stylized_status > 1 else "")
        )


class Demo:
    def __init__(self, stack: Stack, out_dir: Path, pictures: DemoPictures, titles: dict[str, str]) -> None:
        self.stack = stack
        self.out = out_dir
        self.img = out_dir / "img"
        self.pictures = pictures
        self.titles = titles
        self.gw_channel = stack.channel("gateway")
        self.gw = gateway_pb2_grpc.GatewayServiceStub(self.gw_channel)
        self.ing_channel = stack.channel("ingestion")
        self.ing = ingestion_pb2_grpc.IngestionServiceStub(self.ing_channel)
        self._originals: dict[str, str] = {}

    def close(self) -> None:
        self.gw_channel.close()
        self.ing_channel.close()

    def recommend(self, user: str, k: int, category: str = "") -> gateway_pb2.GetRecommendationsResponse:
        req = gateway_pb2.GetRecommendationsRequest(
            user_id=user, k=k, want_stylized=True, filters=gateway_pb2.Filters(category=category)
        )
        return self.gw.GetRecommendations(req, timeout=10)

    def original(self, item_id: str) -> str:
        """Relative path of the item's stored photo (fetched once through ingestion GetItem); "" = none."""
        if item_id in self._originals:
            return self._originals[item_id]
        rel = ""
        try:
            item = self.ing.GetItem(ingestion_pb2.GetItemRequest(item_id=item_id, include_image=True), timeout=10)
            if item.image.data:
                ext = "png" if item.image.data[:4] == b"\x89PNG" else "jpg"
                path = self.img / f"orig-{item_id}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(item.image.data)
                rel = f"img/{path.name}"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        self._originals[item_id] = rel
        return rel

    def stylized(self, user: str, item_id: str, style_item: str) -> str:
        chunks = list(
            self.gw.GetStylizedImage(
                gateway_pb2.GetStylizedImageRequest(user_id=user, item_id=item_id, style_item_id=style_item),
                timeout=20,
            )
        )
        data = b"".join(c.data for c in chunks)
        ext = "png" if chunks and chunks[0].content_type == "image/png" else "jpg"
        path = self.img / f"styl-{item_id}--{style_item}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"img/{path.name}"

    def rows(self, user: str, resp: gateway_pb2.GetRecommendationsResponse) -> list[RecRow]:
        out = []
        for rank, it in enumerate(resp.items, 1):
            stylized = ""
            if it.stylized_status == gateway_pb2.STYLIZED_READY:
                stylized = self.stylized(user, it.item_id, resp.anchor_item_id)
            out.append(
                RecRow(
                    rank,
                    it.item_id,
                    it.title or self.titles.get(it.item_id, it.item_id),
                    it.category,
                    it.price,
                    it.cf_score,
                    it.style_affinity,
                    it.final_score,
                    original=self.original(it.item_id) if it.image_ref else "",
                    stylized=stylized,
                    stylized_status=STATUS.get(it.stylized_status, "").removeprefix("STYLIZED_").lower(),
                    has_look=bool(it.image_ref) or resp.strategy != gateway_pb2.STYLE_PERSONALIZED,
                )
            )
        return out

    def tile(self, item_id: str, note: str = "") -> Tile:
        return Tile(item_id, self.titles.get(item_id, item_id), self.original(item_id), note)


def style_providers(stack: Stack) -> str:
    """The execution providers the style worker reports (CUDA/TensorRT on a GPU, else CPU)."""
    from stylerec.v1 import style_pb2, style_pb2_grpc

    try:
        with stack.channel("style-worker") as channel:
            info = style_pb2_grpc.StyleWorkerServiceStub(channel).ModelInfo(
                style_pb2.StyleModelInfoRequest(), timeout=5
            )
        return ", ".join(info.active_providers) or "unknown providers"
    except grpc.RpcError as exc:
        return f"unknown providers ({exc.code().name})"


def pending(resp: gateway_pb2.GetRecommendationsResponse) -> int:
    return sum(1 for it in resp.items if it.stylized_status == gateway_pb2.STYLIZED_PENDING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.demo", description="StyleRec demo on the embedded stack")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="ingest the most recent N purchases (0 = all)")
    parser.add_argument("--out", type=Path, default=OUT, help="where index.html and img/ go")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SHARED_DATA,
        help="folder with online-retail/ and images/ (default ../shared/data; generated data when absent)",
    )
    parser.add_argument("--stylize-wait", type=float, default=240, help="max seconds to wait for stylized images")
    parser.add_argument("--no-screenshot", action="store_true")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.stylize_wait < 0:
        print("demo: --limit and --stylize-wait must not be negative", file=sys.stderr)
        return 2

    t_start = time.monotonic()
    purchases, data_label = load_purchases(args.limit, args.data_dir)
    pictures = load_pictures(args.data_dir / "images")
    real_customers = data_label.startswith("REAL")
    print(data_label)
    print(f"pictures: {pictures.source}")
    gifts = gift_items(purchases)
    titles = {g.item_id: g.title for g in gifts} | {p.item_id: p.title for p in pictures.all()}
    shoppers = scripted_shoppers(pictures, purchases)
    visitors = gallery_visitors(pictures, purchases)
    stack = Stack(dir=args.out / "stack")
    timings: dict[str, float] = {}
    demo: Demo | None = None
    try:
        stack.down()
        print("starting the stack ...", flush=True)
        t = time.monotonic()
        stack.up()
        timings["stack up"] = time.monotonic() - t
        print(f"stack up in {timings['stack up']:.1f}s; logs in {stack.dir}")

        t = time.monotonic()
        n_gifts, rej_g = upsert(stack, gifts, "gift products", 500)
        n_pics, rej_p = upsert(stack, picture_items(pictures), "prints + photos", 4)
        timings["catalog"] = time.monotonic() - t
        print(f"catalog: {n_gifts} gift products, {n_pics} art/photo prints ({rej_g + rej_p} rejected)")

        t = time.monotonic()
        accepted, dups, rejected = ingest(stack, to_events(purchases), "purchases")
        dt = time.monotonic() - t
        timings["purchases"] = dt
        print(f"ingested {accepted} purchases ({dups} duplicates, {rejected} rejected) in {dt:.1f}s")

        r = redis.Redis.from_url(stack.redis_url)
        pics = [p.item_id for p in pictures.all()]
        timings["embeddings"] = wait_for(
            "the style worker to embed the prints and photos",
            lambda: all(r.exists(keys.item_embedding(i)) for i in pics),
            180,
        )
        print(f"style embeddings of {len(pics)} pictures ready ({timings['embeddings']:.1f}s after the purchases)")

        last_ts = max(p.ts for p in purchases)
        t = time.monotonic()
        ingest(stack, shopper_events(visitors, last_ts), "gallery visitors (synthetic)")
        n_events = accepted + sum(len(v.events) for v in visitors)
        version = train_model(stack, n_events)
        timings["model trained"] = time.monotonic() - t
        print(f"model {version} trained on the archive and hot-loaded by scoring ({timings['model trained']:.1f}s)")

        # The scripted shoppers act after the model exists: scoring folds their events in with it.
        t = time.monotonic()
        pseudo = stack.pseudonymizer()
        scripted = [s for s in shoppers if s.synthetic and s.events]
        ingest(stack, shopper_events(scripted, last_ts + 7200), "scripted shoppers")
        wait_for(
            "scoring to fold the scripted shoppers in with the new model",
            lambda: all(text(r.hget(keys.recs_meta(pseudo(s.user_id)), "model_version")) == version for s in scripted),
            120,
        )
        real = [s.user_id for s in shoppers if not s.synthetic]
        try:
            wait_for(
                "scoring to rewrite the real customer's recommendations with the new model",
                lambda: all(text(r.hget(keys.recs_meta(pseudo(u)), "model_version")) == version for u in real),
                60,
            )
        except RuntimeError as exc:
            print(f"note: {exc}; showing what scoring has written so far")
        timings["shoppers applied"] = time.monotonic() - t
        lovers = [s for s in shoppers if s.expect == "STYLE_PERSONALIZED"]
        wait_for(
            "style profiles of the print lovers",
            lambda: all(r.exists(keys.style_profile(pseudo(s.user_id))) for s in lovers),
            60,
        )

        demo = Demo(stack, args.out, pictures, titles)
        t = time.monotonic()
        answers: dict[str, gateway_pb2.GetRecommendationsResponse] = {}
        shelves: dict[str, gateway_pb2.GetRecommendationsResponse] = {}
        deadline = time.monotonic() + args.stylize_wait
        with tqdm(desc="waiting for stylized images", unit="poll") as bar:
            while True:
                for s in shoppers:
                    answers[s.user_id] = demo.recommend(s.user_id, 8)
                    if answers[s.user_id].strategy == gateway_pb2.STYLE_PERSONALIZED:
                        shelves[s.user_id] = demo.recommend(s.user_id, 4, category="photo")
                waiting = sum(pending(a) for a in [*answers.values(), *shelves.values()])
                bar.set_postfix(pending=waiting)
                bar.update()
                if waiting == 0 or time.monotonic() > deadline:
                    break
                time.sleep(2.0)
        timings["stylized"] = time.monotonic() - t

        views = []
        for s in shoppers:
            resp = answers[s.user_id]
            history = [demo.tile(item, gateway_pb2_event(etype)) for item, etype in s.events]
            if not s.synthetic:
                mine = [p for p in purchases if p.customer == s.user_id][-8:]
                history = [demo.tile(p.stock_code, "purchase") for p in mine]
            view = ShopperView(
                name=s.name,
                user_id=s.user_id,
                story=s.story,
                expect=s.expect,
                strategy=gateway_pb2.Strategy.Name(resp.strategy),
                model_version=resp.model_version,
                degraded=resp.degraded,
                degraded_reason=resp.degraded_reason,
                confidence=resp.style_confidence,
                style_lambda=resp.style_lambda,
                anchor=demo.tile(resp.anchor_item_id) if resp.strategy == gateway_pb2.STYLE_PERSONALIZED else None,
                history=history,
                recs=demo.rows(s.user_id, resp),
            )
            if s.user_id in shelves:
                view.shelf = demo.rows(s.user_id, shelves[s.user_id])
                view.shelf_title = f"Photo prints for {s.name}, drawn in the style of the anchor print"
            views.append(view)

        strategies = Counter(v.strategy for v in views)
        n_stylized = sum(1 for v in views for row in [*v.recs, *v.shelf] if row.stylized)
        as_expected = sum(1 for v in views if v.strategy == v.expect)
        summary = [
            f"{len(views)} shoppers: " + ", ".join(f"{n} {k}" for k, n in sorted(strategies.items())),
            f"{as_expected}/{len(views)} got the strategy their scripted history should lead to",
            f"{n_stylized} stylized images shown (style worker: ONNX Runtime on {style_providers(stack)})",
            "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
        ]
        page = PageData(
            title="StyleRec demo: style-aware recommendations",
            provenance=[
                data_label,
                f"pictures: {pictures.source}",
                f"{len(visitors)} gallery visitors and the scripted shoppers are SYNTHETIC (scripted/seeded), "
                "labelled as such; the customer ids that are numbers are real Online Retail customers"
                if real_customers
                else f"{len(visitors)} gallery visitors and the scripted shoppers are SYNTHETIC",
            ],
            summary=summary,
            shoppers=views,
        )
        path = write_page(args.out, page)
        problems, shown = check_page(path)

        for s in shoppers:
            print_recs(answers[s.user_id], s.user_id, titles)
        shot = ""
        if not args.no_screenshot:
            shot = screenshot(path, args.out / "screenshot.png", height=4000)
        print("\nsummary")
        for line in summary:
            print(f"  {line}")
        print(
            f"  page check: {'OK' if not problems else '; '.join(problems[:5])} ({shown} stylized images on the page)"
        )
        print(f"  screenshot: {args.out / 'screenshot.png' if not shot else 'not taken: ' + shot}")
        print(f"  page: {path}")
        if problems:
            return 1
    finally:
        if demo is not None:
            demo.close()
        if args.keep_up:
            print(
                f"stack left running (state in {stack.dir}); stop it with STYLEREC_STACK_DIR={stack.dir} stylerec down"
            )
        else:
            stack.down()
        print(f"demo took {time.monotonic() - t_start:.1f}s")
    return 0


def gateway_pb2_event(etype: int) -> str:
    return common_pb2.EventType.Name(etype).lower().replace("_", " ")  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
