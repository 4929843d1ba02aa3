"""Interaction data sets for offline evaluation, read by path — never downloaded, never copied.

Each loader returns an :class:`Interactions` table of integer-coded users and items.
When a real file is missing the caller may fall back to :func:`synthetic`, whose
result says ``synthetic=True`` so no number computed on it passes for a real one.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

ONLINE_RETAIL_DEFAULT = (
    Path(__file__).resolve().parents[4] / "shared" / "data" / "online-retail" / "online_retail.csv.gz"
)


class DatasetError(ValueError):
    """The data set cannot be read (missing file, missing column, unparsable value)."""


@dataclass
class Interactions:
    name: str
    users: np.ndarray  # int32 codes
    items: np.ndarray  # int32 codes
    values: np.ndarray  # float32 strength (rating, quantity, 1)
    ts: np.ndarray  # float64 unix seconds (0 when the data set has no time)
    user_ids: list[str]
    item_ids: list[str]
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "interactions": len(self),
            "users": self.n_users,
            "items": self.n_items,
            "synthetic": self.synthetic,
            "notes": self.notes,
        }


def _encode(values: Iterable[str]) -> tuple[np.ndarray, list[str]]:
    index: dict[str, int] = {}
    codes = [index.setdefault(v, len(index)) for v in values]
    return np.asarray(codes, dtype=np.int32), list(index)


def from_rows(
    name: str, rows: list[tuple[str, str, float, float]], synthetic: bool = False, notes: list[str] | None = None
) -> Interactions:
    if not rows:
        raise DatasetError(f"{name}: no interactions")
    u, users = _encode(r[0] for r in rows)
    i, items = _encode(r[1] for r in rows)
    return Interactions(
        name=name,
        users=u,
        items=i,
        values=np.asarray([r[2] for r in rows], dtype=np.float32),
        ts=np.asarray([r[3] for r in rows], dtype=np.float64),
        user_ids=users,
        item_ids=items,
        synthetic=synthetic,
        notes=notes or [],
    )


def ml100k_path() -> Path | None:
    """ML-100K as shipped inside the recbole wheel (found without importing recbole)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    return path if path.exists() else None


def ml100k(path: Path | None = None) -> Interactions:
    """MovieLens 100K: every rating is one implicit positive (the `recommenders` benchmark's view)."""
    path = path or ml100k_path()
    if path is None:
        raise DatasetError("ml-100k not found: `pip install --no-deps recbole==1.2.1` ships it")
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if len(header) < 4 or not header[0].startswith("user_id"):
            raise DatasetError(f"{path}: unexpected header {header}")
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) >= 4:
                rows.append((p[0], p[1], float(p[2]), float(p[3])))
    return from_rows("ml-100k", rows)


def _open_text(path: Path) -> io.TextIOBase:
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def parse_time(text: str) -> float:
    """Unix seconds from a number or an ISO-like date ("2010-12-01 08:26:00", "12/1/2010 8:26")."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%m/%d/%Y %H:%M"):
        try:
            return datetime.strptime(text, fmt).timestamp()
        except ValueError:
            continue
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise DatasetError(f"cannot parse time {text!r}") from None


def online_retail(path: Path | None = None) -> Interactions:
    """UCI Online Retail: purchase lines as implicit events (value = 1 per invoice line).

    Cancellations (invoice "C…" or quantity ≤ 0) and lines without a customer are removed.
    """
    path = path or ONLINE_RETAIL_DEFAULT
    rows: list[tuple[str, str, float, float]] = []
    dropped_cancel = dropped_anon = 0
    times: dict[str, float] = {}
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        need = {"InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "CustomerID"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for rec in reader:
            inv = rec["InvoiceNo"]
            try:
                qty = float(rec["Quantity"])
            except ValueError:
                qty = 0.0
            if inv.startswith("C") or qty <= 0:
                dropped_cancel += 1
                continue
            cust = rec["CustomerID"].strip()
            if not cust:
                dropped_anon += 1
                continue
            date = rec["InvoiceDate"]
            t = times.get(date)
            if t is None:
                t = times[date] = parse_time(date)
            rows.append((cust.removesuffix(".0"), rec["StockCode"].strip().upper(), 1.0, t))
    notes = [
        f"removed {dropped_cancel} cancellation/non-positive lines",
        f"removed {dropped_anon} lines without customer",
    ]
    return from_rows("online-retail", rows, notes=notes)


def csv_interactions(
    path: Path,
    user_col: str,
    item_col: str,
    time_col: str | None = None,
    rating_col: str | None = None,
    sep: str = ",",
) -> Interactions:
    """Any delimited file with a header: one row = one interaction."""
    rows: list[tuple[str, str, float, float]] = []
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = set(reader.fieldnames or [])
        for c in (user_col, item_col, time_col, rating_col):
            if c is not None and c not in cols:
                raise DatasetError(f"{path}: column {c!r} not in header {sorted(cols)}")
        for n, rec in enumerate(reader, start=2):
            u, i = rec[user_col].strip(), rec[item_col].strip()
            if not u or not i:
                continue
            try:
                value = float(rec[rating_col]) if rating_col else 1.0
            except ValueError:
                raise DatasetError(f"{path}:{n}: rating {rec[rating_col]!r} is not a number") from None
            t = parse_time(rec[time_col]) if time_col else float(n)
            rows.append((u, i, value, t))
    return from_rows(path.name, rows)


def synthetic(n_users: int = 600, n_items: int = 400, per_user: int = 30, seed: int = 7) -> Interactions:
    """Generated clustered preferences (labelled synthetic) for machines without the real data."""
    rng = np.random.default_rng(seed)
    clusters = 8
    item_cluster = rng.integers(0, clusters, n_items)
    rows: list[tuple[str, str, float, float]] = []
    for u in range(n_users):
        taste = rng.dirichlet(np.full(clusters, 0.3))
        p = taste[item_cluster] * (1.0 / (1 + np.arange(n_items)) ** 0.3)
        p /= p.sum()
        chosen = rng.choice(n_items, size=per_user, replace=False, p=p)
        for j, it in enumerate(chosen):
            rows.append((f"u{u}", f"i{it}", 1.0, 1_700_000_000.0 + u * 10 + j * 3600.0))
    return from_rows("synthetic", rows, synthetic=True, notes=["generated data, not a benchmark"])


def iter_batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
