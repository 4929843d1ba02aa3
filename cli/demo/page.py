"""The demo's HTML page (``out/demo/index.html``), its link check and its headless-Chromium screenshot.

The page is static and self-contained: every picture is a file next to it
(``img/``), linked relatively, so it can be opened from disk, archived or
served as is. :func:`check_page` is what the tests and ``make demo-check`` run.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from cli.localstack.stack import REPO

# Where `make demo` writes the page and `make demo-check` looks for it.
OUT = REPO / "out" / "demo"


@dataclass
class Tile:
    item_id: str
    title: str
    image: str = ""  # path relative to the page, "" = no picture
    note: str = ""


@dataclass
class RecRow:
    rank: int
    item_id: str
    title: str
    category: str
    price: float
    cf_score: float
    style_affinity: float
    final_score: float
    original: str = ""
    stylized: str = ""
    stylized_status: str = ""
    has_look: bool = True  # False: no photo, so no style embedding (the affinity is the pool's mean)


@dataclass
class ShopperView:
    name: str
    user_id: str
    story: str
    expect: str
    strategy: str
    model_version: str
    degraded: bool
    degraded_reason: str
    confidence: float
    style_lambda: float
    anchor: Tile | None
    history: list[Tile] = field(default_factory=list)
    recs: list[RecRow] = field(default_factory=list)
    shelf: list[RecRow] = field(default_factory=list)
    shelf_title: str = ""


@dataclass
class PageData:
    title: str
    provenance: list[str]
    summary: list[str]
    shoppers: list[ShopperView]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;background:#fafaf7;color:#222}
h1{margin:0 0 4px} .prov{font-size:13px;color:#555;margin:2px 0}
.shopper{background:#fff;border:1px solid #ddd;border-radius:10px;padding:16px;margin:22px 0}
.badge{display:inline-block;padding:2px 9px;border-radius:12px;font-size:12px;font-weight:600;color:#fff}
.STYLE_PERSONALIZED{background:#8a3ffc}.CF{background:#0f62fe}.POPULAR{background:#6f6f6f}
.deg{background:#da1e28}.ok{color:#24a148}.bad{color:#da1e28}
.tiles{display:flex;flex-wrap:wrap;gap:8px}.tile{width:110px;font-size:11px}
.tile img,.txt{width:110px;height:110px;object-fit:cover;border-radius:6px;border:1px solid #ccc}
.txt{display:flex;align-items:center;justify-content:center;text-align:center;background:#eef;padding:4px;box-sizing:border-box}
table{border-collapse:collapse;margin-top:8px;font-size:12px}
td,th{padding:4px 6px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.pair img{height:120px;border-radius:6px;border:1px solid #ccc;margin-right:4px}
.shelf{display:flex;flex-wrap:wrap;gap:14px}.shelfitem{font-size:11px}
.shelfitem img{height:150px;border-radius:6px;border:1px solid #ccc}
.muted{color:#777;font-size:12px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _tile(t: Tile) -> str:
    pic = f'<img src="{_e(t.image)}" alt="{_e(t.title)}">' if t.image else f'<div class="txt">{_e(t.title[:60])}</div>'
    note = f"<br><span class=muted>{_e(t.note)}</span>" if t.note else ""
    return f'<div class="tile">{pic}<div>{_e(t.title[:48])}</div>{note}</div>'


def _pair(row: RecRow) -> str:
    parts = []
    if row.original:
        parts.append(f'<img src="{_e(row.original)}" alt="original {_e(row.item_id)}" title="original">')
    if row.stylized:
        parts.append(
            f'<img class="stylized" src="{_e(row.stylized)}" alt="stylized {_e(row.item_id)}" title="stylized">'
        )
    elif row.stylized_status:
        parts.append(f"<span class=muted>{_e(row.stylized_status)}</span>")
    return f'<td class="pair">{"".join(parts)}</td>'


def _affinity(r: RecRow) -> str:
    if r.has_look:
        return f"{r.style_affinity:.3f}"
    why = "no photo, so no style embedding: the mean of the pool is used"
    return f'<span class=muted title="{why}">n/a ({r.style_affinity:.3f})</span>'


def _recs_table(rows: list[RecRow]) -> str:
    if not rows:
        return "<p class=muted>no recommendations</p>"
    head = (
        "<tr><th>#</th><th>item</th><th>category</th><th>price</th><th>cf_score</th>"
        "<th>style_affinity</th><th>final</th><th>original / stylized</th></tr>"
    )
    body = "".join(
        f"<tr><td>{r.rank}</td><td>{_e(r.title[:60])}<br><span class=muted>{_e(r.item_id)}</span></td>"
        f"<td>{_e(r.category)}</td><td class=num>{r.price:.2f}</td><td class=num>{r.cf_score:.3f}</td>"
        f"<td class=num>{_affinity(r)}</td><td class=num><b>{r.final_score:.3f}</b></td>{_pair(r)}</tr>"
        for r in rows
    )
    note = (
        "<p class=muted>n/a: the item has no photo, so no style embedding; the blend uses the mean affinity "
        "of the pool for it (an unknown look is neither a match nor a mismatch).</p>"
        if any(not r.has_look for r in rows)
        else ""
    )
    return f"<table>{head}{body}</table>{note}"


def _shelf(rows: list[RecRow]) -> str:
    items = []
    for r in rows:
        pics = ""
        if r.original:
            pics += f'<img src="{_e(r.original)}" alt="original {_e(r.item_id)}">'
        if r.stylized:
            pics += f' <img class="stylized" src="{_e(r.stylized)}" alt="stylized {_e(r.item_id)}">'
        else:
            pics += f" <span class=muted>{_e(r.stylized_status)}</span>"
        items.append(
            f'<div class="shelfitem">{pics}<div>{_e(r.title)} — final {r.final_score:.3f} '
            f"(cf {r.cf_score:.3f}, style {r.style_affinity:.3f})</div></div>"
        )
    return f'<div class="shelf">{"".join(items)}</div>'


def render(page: PageData) -> str:
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(page.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(page.title)}</h1>",
        *[f'<p class="prov">{_e(line)}</p>' for line in page.provenance],
        "<ul>",
        *[f"<li>{_e(line)}</li>" for line in page.summary],
        "</ul>",
    ]
    for s in page.shoppers:
        ok = s.strategy == s.expect if s.expect else True
        deg = f' <span class="badge deg">degraded: {_e(s.degraded_reason)}</span>' if s.degraded else ""
        out.append('<section class="shopper">')
        out.append(
            f"<h2>{_e(s.name)} <span class='badge {_e(s.strategy)}'>{_e(s.strategy)}</span>{deg}</h2>"
            f"<p>{_e(s.story)}. <span class=muted>user id {_e(s.user_id)} · model {_e(s.model_version or '-')}"
            f" · style confidence {s.confidence:.2f}"
            + (f" · λ {s.style_lambda:.2f}" if s.strategy == "STYLE_PERSONALIZED" else "")
            + "</span>"
            + (f" <span class={'ok' if ok else 'bad'}>(expected {_e(s.expect)})</span>" if s.expect else "")
            + "</p>"
        )
        if s.anchor is not None:
            out.append(f"<p><b>Style anchor</b> (the item whose look is transferred):</p>{_tile(s.anchor)}")
        out.append("<h3>History</h3>")
        out.append(
            f'<div class="tiles">{"".join(_tile(t) for t in s.history)}</div>'
            if s.history
            else "<p class=muted>no history</p>"
        )
        out.append("<h3>Recommendations</h3>")
        out.append(_recs_table(s.recs))
        if s.shelf:
            out.append(f"<h3>{_e(s.shelf_title)}</h3>")
            out.append(_shelf(s.shelf))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_page(out_dir: Path, page: PageData) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(render(page), encoding="utf-8")
    return path


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for attr in ("src", "href"):
            if a.get(attr):
                self.links.append((tag, a[attr], a))


def page_links(path: Path) -> list[tuple[str, str, dict[str, str]]]:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.links


def check_page(path: Path) -> tuple[list[str], int]:
    """(problems, number of stylized images shown): every link must be a local file that exists."""
    if not path.exists():
        return [f"{path} does not exist"], 0
    problems = []
    stylized = 0
    for tag, link, attrs in page_links(path):
        if "://" in link or link.startswith(("/", "data:", "javascript:")):
            problems.append(f"<{tag}> links outside the page folder: {link}")
            continue
        target = (path.parent / link).resolve()
        if not target.is_file() or target.stat().st_size == 0:
            problems.append(f"<{tag}> links to a missing or empty file: {link}")
        if tag == "img" and "stylized" in attrs.get("class", ""):
            stylized += 1
    return problems, stylized


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400, timeout_s: float = 90) -> str:
    """Render ``page`` in headless Chromium into ``png``; returns "" on success, else why not."""
    binary = chromium_binary()
    if binary is None:
        return "chromium not installed (apt-get install chromium, or STYLEREC_WITH_BROWSER=1 make setup)"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="stylerec-chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"chromium timed out after {timeout_s}s"
    if not png.exists() or png.stat().st_size == 0:
        return f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-400:]}"
    return ""
