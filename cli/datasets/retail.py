"""Online Retail purchases (the demo's, the load test's and the scoring bench's input) when
../shared/data is present, otherwise a generated sample that is clearly labelled synthetic;
and the gift shop's catalog those purchases imply."""

from __future__ import annotations

import csv
import gzip
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stylerec.v1 import common_pb2

from cli.localstack.stack import REPO

SHARED_DATA = REPO.parent / "shared" / "data"
ONLINE_RETAIL = SHARED_DATA / "online-retail" / "online_retail.csv.gz"
# Stock codes that are fees and adjustments, not products a shopper would want recommended.
NON_PRODUCT_CODES = {"POST", "DOT", "M", "D", "C2", "CRUK", "PADS", "B", "S", "AMAZONFEE", "BANK CHARGES"}


@dataclass
class Purchase:
    invoice: str
    stock_code: str
    description: str
    quantity: float
    ts: float
    price: float
    customer: str


def read_online_retail(path: Path = ONLINE_RETAIL) -> Iterator[Purchase]:
    """Purchases only: cancellations (invoice 'C…'), non-positive quantities and rows without customer dropped."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            invoice = row["InvoiceNo"]
            if invoice.startswith("C") or not row["CustomerID"]:
                continue
            qty = float(row["Quantity"] or 0)
            if qty <= 0 or row["StockCode"].strip().upper() in NON_PRODUCT_CODES:
                continue
            ts = datetime.strptime(row["InvoiceDate"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            yield Purchase(
                invoice=invoice,
                stock_code=row["StockCode"].strip(),
                description=row["Description"].strip(),
                quantity=qty,
                ts=ts.timestamp(),
                price=float(row["UnitPrice"] or 0),
                customer=str(int(float(row["CustomerID"]))),
            )


def synthetic_purchases(n_users: int = 300, n_items: int = 400, n_events: int = 20000, seed: int = 7) -> list[Purchase]:
    """SYNTHETIC: Zipf-popular items, users with a few favourite 'aisles'. Used only without ../shared/data."""
    rng = random.Random(seed)
    aisles = [list(range(a, n_items, 8)) for a in range(8)]
    base = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    out = []
    for e in range(n_events):
        u = rng.randrange(n_users)
        aisle = aisles[(u * 3 + rng.choice([0, 0, 0, 1])) % 8]
        item = aisle[min(len(aisle) - 1, int(rng.paretovariate(1.2)) - 1)]
        out.append(
            Purchase(
                invoice=f"S{e}",
                stock_code=f"SYN{item:04d}",
                description=f"synthetic item {item}",
                quantity=1,
                ts=base + e * 60,
                price=1.0 + item % 20,
                customer=f"syn-user-{u}",
            )
        )
    return out


def to_events(purchases: list[Purchase]) -> list[common_pb2.Event]:
    events = []
    for i, p in enumerate(purchases):
        e = common_pb2.Event(
            event_id=f"or-{p.invoice}-{p.stock_code}-{i}",
            user_id=p.customer,
            item_id=p.stock_code,
            type=common_pb2.PURCHASE,
            value=p.quantity,
        )
        e.timestamp.FromNanoseconds(int(p.ts * 1e9))
        events.append(e)
    return events


def load_purchases(limit: int, data_dir: Path) -> tuple[list[Purchase], str]:
    online_retail = data_dir / "online-retail" / "online_retail.csv.gz"
    if online_retail.exists():
        purchases = sorted(read_online_retail(online_retail), key=lambda p: p.ts)
        total = len(purchases)
        if limit and limit < total:
            purchases = purchases[-limit:]
            return purchases, (
                f"REAL data: the most recent {len(purchases):,} of {total:,} Online Retail purchases "
                f"({online_retail}; subsampled so the demo fits a few minutes on a 2-core machine)"
            )
        return purchases, f"REAL data: all {total:,} Online Retail purchases ({online_retail})"
    purchases = synthetic_purchases()
    if limit:
        purchases = purchases[-limit:]
    return purchases, f"SYNTHETIC purchases ({online_retail} not found): generated shoppers and items, not real data"


def gift_items(purchases: Iterable[Purchase]) -> list[common_pb2.Item]:
    """The gift shop's catalog: one item per stock code seen in the purchases, titled by its description
    and priced at its median unit price (no photo: the shop has none)."""
    prices: dict[str, list[float]] = defaultdict(list)
    titles: dict[str, str] = {}
    for p in purchases:
        prices[p.stock_code].append(p.price)
        titles.setdefault(p.stock_code, p.description or p.stock_code)
    return [
        common_pb2.Item(
            item_id=code,
            title=titles[code][:200],
            category="gift",
            brand="online-retail",
            price=round(max(0.0, statistics.median(ps)), 2),
        )
        for code, ps in prices.items()
    ]
