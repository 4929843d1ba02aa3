"""Scripted shoppers for the demo, and the (synthetic) gallery visitors that give prints a history.

The Online Retail shop sold no prints, so nothing links them to anything until
someone buys them. A few dozen *gallery visitors* (SYNTHETIC, seeded, labelled
as such on the page) each buy a couple of photo prints, an art print and some of
the shop's best sellers; that gives collaborative filtering co-purchases to work
with. Then the scripted shoppers act:

* three who love particular art prints (favourite, cart, purchase) — their style
  profile becomes confident → STYLE_PERSONALIZED, with photos drawn in their print's style;
* one who bought gifts and only glanced at a print — history but no confident style → CF;
* the real Online Retail customer with the most purchases in the sample → CF;
* someone the shop has never seen → POPULAR.

All their events are timestamped just after the last Online Retail purchase, so
scoring's time decay treats them as the newest activity of that shop.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from stylerec.v1 import common_pb2

from cli.datasets.retail import Purchase
from cli.demo.catalog import DemoPictures

FAV: int = common_pb2.FAVORITE
CART: int = common_pb2.ADD_TO_CART
BUY: int = common_pb2.PURCHASE
VIEW: int = common_pb2.VIEW


@dataclass
class Shopper:
    user_id: str
    name: str
    story: str
    expect: str  # the strategy the scripted history should lead to
    events: list[tuple[str, int]] = field(default_factory=list)  # (item_id, EventType)
    synthetic: bool = True


def _pick(pictures: DemoPictures, stem: str, fallback: int) -> str:
    ids = [p.item_id for p in pictures.prints]
    wanted = f"print-{stem}"
    return wanted if wanted in ids else ids[fallback % len(ids)]


def best_sellers(purchases: list[Purchase], n: int = 40) -> list[str]:
    return [code for code, _ in Counter(p.stock_code for p in purchases).most_common(n)]


def scripted_shoppers(pictures: DemoPictures, purchases: list[Purchase]) -> list[Shopper]:
    gifts = best_sellers(purchases, 12)
    lovers = [
        ("demo-vincent-fan", "Vincent's fan", "starry_night", "woman-with-hat-matisse", 0, 3),
        ("demo-storm-watcher", "Storm watcher", "the_scream", "shipwreck", 1, 2),
        ("demo-texture-collector", "Texture collector", "brick", "gravel", 4, 6),
    ]
    shoppers = []
    for n, (uid, name, loved, also, f1, f2) in enumerate(lovers):
        a, b = _pick(pictures, loved, f1), _pick(pictures, also, f2)
        events = [(a, FAV), (a, CART), (a, BUY), (b, BUY), (gifts[n], BUY), (gifts[n + 3], BUY)]
        title = next(p.title for p in pictures.prints if p.item_id == a)
        shoppers.append(
            Shopper(
                uid,
                name,
                f"loves {title.removeprefix('Art print: ')}; also bought a second print",
                "STYLE_PERSONALIZED",
                events,
            )
        )
    glance = _pick(pictures, "shipwreck", 2)
    shoppers.append(
        Shopper(
            "demo-gift-browser",
            "Gift browser",
            "bought gifts and only glanced at one print (style evidence too thin)",
            "CF",
            [(gifts[6], BUY), (gifts[7], BUY), (gifts[8], BUY), (glance, VIEW)],
        )
    )
    top_customer = Counter(p.customer for p in purchases).most_common(1)
    if top_customer:
        shoppers.append(
            Shopper(
                top_customer[0][0],
                f"Customer {top_customer[0][0]}",
                "the Online Retail customer with the most purchases in the sample (history only, no prints)",
                "CF",
                synthetic=False,
            )
        )
    shoppers.append(Shopper("demo-newcomer", "Newcomer", "never seen by the shop", "POPULAR"))
    return shoppers


def gallery_visitors(pictures: DemoPictures, purchases: list[Purchase], n: int = 40, seed: int = 11) -> list[Shopper]:
    """SYNTHETIC background shoppers who buy photo prints, art prints and best sellers together."""
    rng = random.Random(seed)
    gifts = best_sellers(purchases, 40)
    photos = [p.item_id for p in pictures.photos]
    prints = [p.item_id for p in pictures.prints]
    out = []
    for v in range(n):
        items = rng.sample(photos, k=min(2, len(photos))) + rng.sample(prints, k=1)
        items += rng.sample(gifts, k=min(3, len(gifts)))
        out.append(
            Shopper(f"demo-visitor-{v}", f"visitor {v}", "synthetic gallery visitor", "", [(i, BUY) for i in items])
        )
    return out


def shopper_events(shoppers: list[Shopper], start_ts: float) -> list[common_pb2.Event]:
    """Events one minute apart, starting at ``start_ts`` (just after the shop's last purchase)."""
    events = []
    t = start_ts
    for s in shoppers:
        for n, (item, etype) in enumerate(s.events):
            t += 60.0
            e = common_pb2.Event(
                event_id=f"demo-{s.user_id}-{n}",
                user_id=s.user_id,
                item_id=item,
                type=etype,  # type: ignore[arg-type]
                value=1.0 if etype == BUY else 0.0,
            )
            e.timestamp.FromNanoseconds(int(t * 1e9))
            events.append(e)
    return events
