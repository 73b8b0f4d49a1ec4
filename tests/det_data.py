"""A tiny COCO-format dataset written into a temporary folder, with the awkward parts of real
COCO files: non-contiguous category ids, a crowd box, an image without boxes, a zero-size box and
an image file the json does not list; as options, image ids that are strings or no zero-size box,
and ``truncate`` for a JPEG that cannot be decoded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

CAT_IDS = [3, 17, 90]  # gaps, as in COCO
COLORS = {3: (220, 40, 40), 17: (40, 200, 40), 90: (40, 40, 220)}


def _boxes(i: int, empty: int | None = 3) -> list[tuple[int, list[float], int]]:
    """(category id, [x, y, w, h], iscrowd) for image ``i``: two boxes (image 0 also a crowd
    region), none for image ``empty``."""
    if i == empty:
        return []
    out = [(CAT_IDS[i % 3], [4.0 + i, 6.0, 20.0, 14.0], 0), (CAT_IDS[(i + 1) % 3], [36.0, 20.0 + i, 18.0, 16.0], 0)]
    if i == 0:
        out.append((CAT_IDS[2], [2.0, 30.0, 24.0, 14.0], 1))  # a crowd region
    return out


def write_split(root: Path, split: str, n: int, size: tuple[int, int] = (64, 48), empty: int | None = 3,
                zero_box: bool = True, str_ids: bool = False) -> dict[str, Any]:
    """``n`` images; ``zero_box``: add the zero-size box (which COCOeval counts as a miss);
    ``str_ids``: image ids ``'img-100'``... instead of ``100``..."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = Image.new("RGB", size, (128, 128, 128))
        draw = ImageDraw.Draw(img)
        image_id = f"img-{100 + i}" if str_ids else 100 + i  # ids need not start at 1, nor be numbers
        for cat, (x, y, w, h), crowd in _boxes(i, empty):
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[cat])
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})
        img.save(root / split / f"{i:04d}.jpg", quality=95)
        images.append({"id": image_id, "file_name": f"{i:04d}.jpg", "width": size[0], "height": size[1]})
    if zero_box:  # zero width: dropped from training with a count
        anns.append({"id": len(anns) + 1, "image_id": images[0]["id"], "category_id": 3,
                     "bbox": [10.0, 10.0, 0.0, 5.0], "area": 0.0, "iscrowd": 0})
    Image.new("RGB", size).save(root / split / "not_in_json.jpg")
    data = {"info": {"description": "test"}, "images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in CAT_IDS]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return data


def make_dataset(root: Path, n_train: int = 4, n_val: int = 4, empty: int | None = 3, zero_box: bool = True,
                 str_ids: bool = False) -> Path:
    write_split(root, "train2017", n_train, empty=empty, zero_box=zero_box, str_ids=str_ids)
    write_split(root, "val2017", n_val, empty=empty, zero_box=zero_box, str_ids=str_ids)
    return root


def truncate(path: Path) -> None:
    """Cut a file to half its length: a JPEG that opens (its header is intact) but cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
