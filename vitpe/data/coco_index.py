"""COCO-format annotations (``instances_<split>.json``) read and checked once, up front, so that a
bad file fails with one message naming it (or, with ``on_error='skip'``, the bad entries are
dropped, counted and logged):

- a json that is not COCO (``images``, ``annotations``, ``categories`` missing, an id that is a list
  or an object, image ids of kinds that cannot be ordered) is always an error;
- an annotation without ``bbox``, ``image_id`` or ``category_id`` (a segmentation without its
  box), one naming an unknown image or category, a box reaching outside its image by more than a
  pixel, or an image file that does not exist: error, or skip by option; with ``clip_boxes`` a box
  reaching past the edge is clipped to the image instead, as DETR's loader does (counted and
  logged), and only one wholly outside it is bad;
- boxes of zero width or height (also once clipped to the image) are always dropped, with a
  count; boxes within a pixel past the edge are clipped; ``iscrowd`` boxes are never given to the
  matcher;
- an image entry without ``width`` and ``height`` takes them from its file's header; image files
  the json does not list are ignored; images without annotations are kept.

These checks shape the training targets only. COCOeval scores against the json as it is
(``CocoIndex.gt``): zero-size boxes, boxes past the edge (unclipped) and crowd regions included, as
pycocotools run on the file does, so the AP reported is the official one. Images left out entirely
(a missing file, an unreadable one under ``skip``) are left out of the evaluated images too.

Image ids may be numbers or strings, as pycocotools takes either; targets and results carry them
unchanged. Category ids need not be contiguous (COCO's run 1..90 with gaps): labels are the index
of the id in the sorted list ``CocoIndex.cat_ids``, which maps them back for results.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

_logger = logging.getLogger(__name__)
OnError = Literal["error", "skip"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image edge (rounding in real files) before it is bad


class CocoFormatError(DataError):
    """A json that is not COCO, or an entry in it that cannot be used."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path} (expected DIR/annotations/instances_<split>.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: not a COCO file: expected an object with images, annotations and "
                              f"categories, got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing key" if key not in data else "not a list:"
            raise CocoFormatError(f"{path}: not a COCO file: {what} {key!r} (expected images, annotations, "
                                  f"categories)")
    return data


def _need(entry: Any, keys: tuple[str, ...], what: str, path: Path) -> None:
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise CocoFormatError(f"{path}: {what} {str(entry)[:80]} lacks {', '.join(repr(k) for k in missing)}")


def _need_ids(entry: dict[str, Any], keys: tuple[str, ...], what: str, path: Path) -> None:
    """Ids are looked up (as dict keys, here and in pycocotools): a list or an object cannot be."""
    for k in keys:
        if isinstance(entry[k], (list, dict)):
            raise CocoFormatError(f"{path}: {what} {str(entry)[:80]} has {k} {entry[k]!r}: ids are numbers or "
                                  f"strings")


def _need_order(ids: list[Any], what: str, path: Path) -> None:
    """COCOeval sorts the image ids (and ``cat_ids`` the category ids): numbers and strings mixed cannot be."""
    try:
        sorted(ids)
    except TypeError:
        kinds = {type(i).__name__: i for i in ids}
        raise CocoFormatError(f"{path}: {what} ids mix kinds that cannot be ordered "
                              f"({', '.join(f'{v!r} ({k})' for k, v in kinds.items())})") from None


def _is_number(v: Any) -> bool:
    """A finite int or float, not a bool (json.loads reads NaN and Infinity, and true as True)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_box(box: Any) -> bool:
    """``[x, y, width, height]`` as four finite numbers."""
    return isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)


def _extras_problem(a: dict[str, Any]) -> str | None:
    """What is wrong with an annotation's ``iscrowd`` or ``area``, which COCOeval compares as numbers
    (either may be absent: 0 and the box's area are filled in)."""
    crowd = a.get("iscrowd", 0)
    if not (isinstance(crowd, int) and crowd in (0, 1)):
        return f"iscrowd {crowd!r} is not 0 or 1"
    if "area" in a and not (_is_number(a["area"]) and a["area"] >= 0):
        return f"area {a['area']!r} is not a non-negative number"
    return None


def _scored(a: dict[str, Any]) -> bool:
    """Whether COCOeval can score the annotation as it stands (else it is left out of the ground truth,
    having been named or counted when the json was read)."""
    return all(k in a for k in ("image_id", "category_id")) and _is_box(a.get("bbox")) and _extras_problem(a) is None


@dataclass
class CocoIndex:
    """A checked COCO json: the images and training boxes kept, the label mapping, what was dropped
    and the json as read (``source``), which evaluation scores against."""

    path: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]  # the training boxes: clipped, without zero-size or bad ones
    categories: list[dict[str, Any]]
    source: dict[str, Any]  # the json as read
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    clipped: int = 0  # training boxes clipped to their image (more than a pixel past it; ``clip_boxes``)

    @property
    def cat_ids(self) -> list[int]:
        """Sorted category ids; label ``i`` is ``cat_ids[i]``."""
        return sorted(c["id"] for c in self.categories)

    @property
    def class_names(self) -> list[str]:
        names = {c["id"]: str(c["name"]) for c in self.categories}
        return [names[i] for i in self.cat_ids]

    def by_image(self) -> dict[Any, list[dict[str, Any]]]:
        out: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for a in self.annotations:
            out[a["image_id"]].append(a)
        return out

    @cached_property
    def gt(self) -> Any:
        """A pycocotools ``COCO`` over the json as read, for COCOeval: every image and every box, the
        crowd regions and the boxes training drops or clips included, scored as pycocotools run on
        the file scores them. Left out are only boxes that are not four finite numbers or whose
        ``iscrowd`` or ``area`` is not a number (dropped under ``on_error='skip'``), which COCOeval
        cannot score; a missing ``iscrowd`` or ``area``
        is filled in (0, the box's area), where pycocotools would stop. Annotation ids are
        renumbered from 1: pycocotools takes a ground-truth id of 0 for "unmatched" and looks
        repeated ids up as one box, so a file with such ids would lose AP for its ids alone (with
        unique positive ids, as in COCO's files, the numbering changes nothing)."""
        from pycocotools.coco import COCO

        anns: list[dict[str, Any]] = []
        for a in self.source["annotations"]:
            if _scored(a):
                anns.append(dict(a, id=len(anns) + 1, iscrowd=int(a.get("iscrowd", 0)),
                                 area=a.get("area", a["bbox"][2] * a["bbox"][3])))
        coco = COCO()
        coco.dataset = {**self.source, "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
            coco.createIndex()
        return coco


class _Checker:
    """Applies ``on_error`` to bad entries: raise, or drop, count and log the first few."""

    def __init__(self, path: Path, on_error: OnError, clip_boxes: bool = False) -> None:
        self.path, self.on_error, self.dropped = path, on_error, Counter()
        self.clip_boxes, self.clipped = clip_boxes, 0

    def bad(self, reason: str, message: str, hint: str = "") -> None:
        if self.on_error == "error":
            raise CocoFormatError(f"{self.path}: {message} ({hint}set data.on_error=skip to drop such entries)")
        self.dropped[reason] += 1
        if self.dropped[reason] <= 3:
            _logger.warning("warning: %s: skipped %s", self.path.name, message)


def _check_box(a: dict[str, Any], img: dict[str, Any], check: _Checker) -> list[float] | None:
    """The box clipped to the image, or None when it is dropped (zero size) or bad. A crowd box
    (never trained on, scored from the json as it is) is clipped without complaint."""
    box = a["bbox"]
    if not _is_box(box):
        check.bad("bad bbox", f"annotation {a.get('id')}: bbox {box!r} is not [x, y, width, height] "
                              f"(four finite numbers)")
        return None
    x, y, w, h = (float(v) for v in box)
    W, H = float(img["width"]), float(img["height"])
    if w < 0 or h < 0:
        check.bad("negative size", f"annotation {a.get('id')}: bbox {box} has a negative width or height")
        return None
    if w == 0 or h == 0:
        check.dropped["zero size"] += 1  # always dropped: no box to learn or to score
        return None
    x0, y0, x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H), max(min(x + w, W), 0.0), max(min(y + h, H), 0.0)
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > W + t or y + h > H + t:
        where = f"image {img['id']!r} ({img['file_name']}, {img['width']}x{img['height']})"
        crowd = bool(a.get("iscrowd", 0))
        if not (check.clip_boxes or crowd):
            check.bad("outside image", f"annotation {a.get('id')}: bbox {box} reaches outside {where}",
                      "set data.clip_boxes=true to clip such boxes to the image, as DETR does, or ")
            return None
        if x1 <= x0 or y1 <= y0:
            check.bad("outside image", f"annotation {a.get('id')}: bbox {box} lies wholly outside {where}")
            return None
        if not crowd:
            check.clipped += 1
            if check.clipped <= 3:
                _logger.warning("warning: %s: clipped annotation %s: bbox %s to %s", check.path.name, a.get("id"),
                                box, where)
    if x1 <= x0 or y1 <= y0:  # within the tolerance but wholly past the edge: nothing left in the image
        check.dropped["zero size"] += 1
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def _header_size(file: Path) -> tuple[int, int] | str:
    """``(width, height)`` from an image file's header (nothing decoded), or why it cannot be read
    (not an image; or one over PIL's pixel limit, which PIL refuses to open)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            return im.size
    except UnidentifiedImageError:
        return "is not an image"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds on files it cannot read
        return f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})"


def _check_images(data: dict[str, Any], path: Path, image_dir: Path, check: _Checker) -> list[dict[str, Any]]:
    """The image entries kept; one without ``width`` and ``height`` (which pycocotools does not need,
    and some converters leave out) takes them from its file's header."""
    images, seen, sized = [], set(), 0
    for img in data["images"]:
        _need(img, ("id", "file_name"), "image", path)
        _need_ids(img, ("id",), "image", path)
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise CocoFormatError(f"{path}: image {img['id']!r} has file_name {img['file_name']!r}: expected the "
                                  f"image's file name (a path relative to the image folder)")
        exists = (image_dir / img["file_name"]).is_file()  # one stat an image: a json may list 100k+
        if ("width" not in img or "height" not in img) and exists:
            size = _header_size(image_dir / img["file_name"])
            if isinstance(size, str):
                check.bad("unreadable image", f"image {img['id']}: {image_dir / img['file_name']} {size} "
                                              f"(and the json gives no width and height)")
                continue
            img, sized = dict(img, width=size[0], height=size[1]), sized + 1
        for k in ("width", "height"):  # compared with the decoded pixels, and boxes checked against them
            if k not in img:  # the file is missing: named below
                continue
            v = img[k]
            if not _is_number(v) or v != int(v) or v <= 0:
                raise CocoFormatError(f"{path}: image {img['id']!r} ({img['file_name']}) has {k} {v!r}: expected a "
                                      f"positive whole number of pixels")
        if img["id"] in seen:
            check.bad("duplicate image id", f"image id {img['id']} appears twice")
            continue
        if not exists:
            check.bad("missing file", f"image {img['id']}: file {image_dir / img['file_name']} does not exist")
            continue
        seen.add(img["id"])
        images.append(img)
    if sized:
        _logger.info("%s: %d image(s) without width and height in the json took them from their files", path.name,
                     sized)
    return images


def _check_annotations(data: dict[str, Any], images: dict[Any, dict[str, Any]], cats: set[Any], path: Path,
                       check: _Checker) -> list[dict[str, Any]]:
    """The annotations kept for training; ``images``: the json's images kept (an annotation of one
    left out, already named and counted, goes with it, counted under "of a left-out image")."""
    kept, listed = [], {img["id"] for img in data["images"]}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise CocoFormatError(f"{path}: annotation #{i} is {str(a)[:80]}: expected an object")
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in a]
        if missing:  # e.g. a segmentation without its box: nothing to train on or to score
            check.bad("missing keys", f"annotation {a.get('id', f'#{i}')} has no {' or '.join(map(repr, missing))}")
            continue
        _need_ids(a, ("image_id", "category_id"), "annotation", path)
        problem = _extras_problem(a)
        if problem:
            check.bad("bad iscrowd or area", f"annotation {a.get('id', f'#{i}')}: {problem}")
            continue
        if a["image_id"] not in images:
            if a["image_id"] in listed:
                check.dropped["of a left-out image"] += 1
            else:
                check.bad("unknown image", f"annotation {a.get('id', f'#{i}')} names unknown image id "
                                           f"{a['image_id']!r}")
            continue
        if a["category_id"] not in cats:
            check.bad("unknown category", f"annotation {a.get('id', f'#{i}')} names unknown category id "
                                          f"{a['category_id']!r} (known: {sorted(cats)[:10]})")
            continue
        box = _check_box(a, images[a["image_id"]], check)
        if box is None:
            continue
        kept.append(dict(a, bbox=box, iscrowd=int(a.get("iscrowd", 0))))
    return kept


def load_coco(ann_file: str | Path, image_dir: str | Path, on_error: OnError = "error",
              clip_boxes: bool = False) -> CocoIndex:
    """Read and check a COCO json against the images in ``image_dir``; ``clip_boxes``: clip boxes
    that reach more than a pixel past their image to it (else they are bad entries)."""
    path, image_dir = Path(ann_file), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    data = _read_json(path)
    check = _Checker(path, on_error, clip_boxes)
    for c in data["categories"]:
        _need(c, ("id", "name"), "category", path)
        _need_ids(c, ("id",), "category", path)
    cats = [c["id"] for c in data["categories"]]
    _need_order(cats, "category", path)
    if len(set(cats)) != len(cats):
        raise CocoFormatError(f"{path}: category ids repeat: {sorted(k for k, n in Counter(cats).items() if n > 1)}")
    if not cats:
        raise CocoFormatError(f"{path}: no categories")
    images = _check_images(data, path, image_dir, check)
    _need_order([img["id"] for img in data["images"]], "image", path)
    anns = _check_annotations(data, {img["id"]: img for img in images}, set(cats), path, check)
    index = CocoIndex(path, images, anns, data["categories"], data, check.dropped, check.clipped)
    listed = {os.path.normpath(img["file_name"]) for img in images}  # "sub/a.jpg", "./a.jpg" as the files'
    unlisted = sum(1 for f in image_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                   and os.path.normpath(f.relative_to(image_dir)) not in listed)
    boxed = {a["image_id"] for a in anns if not a["iscrowd"]}
    left_out = len(data["images"]) - len(images)
    _logger.info("%s: %d images (%d without boxes to learn, kept), %d boxes (%d crowd), %d categories%s%s%s",
                 path.name, len(images), sum(img["id"] not in boxed for img in images), len(anns),
                 sum(a["iscrowd"] for a in anns), len(cats),
                 "".join(f"; dropped {n} ({r})" for r, n in sorted(check.dropped.items()))
                 + (f"; clipped {check.clipped} to their image" if check.clipped else ""),
                 f"; {left_out} of the json's {len(data['images'])} images left out of training and evaluation"
                 if left_out else "",
                 f"; ignored {unlisted} image file(s) the json does not list" if unlisted else "")
    return index


__all__ = ["BOX_TOLERANCE", "IMAGE_SUFFIXES", "CocoFormatError", "CocoIndex", "OnError", "load_coco"]
