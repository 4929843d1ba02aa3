"""The demo catalog: the gift shop's products, plus art prints and photo prints with real pictures.

* gift products: every Online Retail stock code in the ingested sample
  (:func:`cli.datasets.retail.gift_items`; no photos, so they can never be stylized);
* art prints: one item per style image in ``../shared/data/images/styles``
  (van Gogh, Munch, Turner, Matisse, and three textures);
* photo prints: one item per photo in ``images/products``.

Without ``../shared/data`` the pictures are generated patterns and every title
says "(generated)".
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from stylerec.v1 import common_pb2

from cli.datasets.images import find_images
from cli.datasets.retail import SHARED_DATA

IMAGES = SHARED_DATA / "images"
MAX_SIDE = 640

ART_TITLES = {
    "starry_night": "The Starry Night (van Gogh, 1889)",
    "the_scream": "The Scream (Munch, 1893)",
    "shipwreck": "The Shipwreck (Turner, 1805)",
    "woman-with-hat-matisse": "Woman with a Hat (Matisse, 1905)",
    "brick": "Brick texture",
    "grass": "Grass texture",
    "gravel": "Gravel texture",
}
PHOTO_TITLES = {
    "coffee": "Coffee cup",
    "apple": "Apple",
    "orange": "Orange",
    "fruits": "Fruit bowl",
    "flower": "Flower",
    "smarties": "Smarties",
    "stuff": "Desk things",
}


@dataclass
class Picture:
    item_id: str
    title: str
    category: str
    data: bytes  # JPEG, at most MAX_SIDE on the long side
    price: float


@dataclass
class DemoPictures:
    prints: list[Picture]
    photos: list[Picture]
    source: str
    real: bool

    def all(self) -> list[Picture]:
        return [*self.prints, *self.photos]


def _jpeg(img: Image.Image) -> bytes:
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def load_pictures(images_dir: Path = IMAGES) -> DemoPictures:
    products, styles, source = find_images(images_dir if images_dir.exists() else None)
    real = images_dir.exists() and not source.startswith("GENERATED")
    suffix = "" if real else " (generated)"
    prints = [
        Picture(f"print-{stem}", f"Art print: {ART_TITLES.get(stem, stem)}{suffix}", "art-print", _jpeg(img), 25.0)
        for stem, img in styles.items()
    ]
    photos = [
        Picture(f"photo-{stem}", f"Photo print: {PHOTO_TITLES.get(stem, stem)}{suffix}", "photo", _jpeg(img), 15.0)
        for stem, img in products.items()
    ]
    return DemoPictures(prints, photos, source, real)


def picture_items(pictures: DemoPictures) -> list[common_pb2.Item]:
    return [
        common_pb2.Item(
            item_id=p.item_id,
            title=p.title,
            category=p.category,
            brand="stylerec-demo",
            price=p.price,
            image=common_pb2.Image(data=p.data, content_type="image/jpeg"),
        )
        for p in pictures.all()
    ]
