"""COCO-format data: checks on real-world awkwardness, label mapping, transforms, COCOeval."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from det_data import CAT_IDS, make_dataset, truncate
from torchvision import tv_tensors

from vitpe.data.coco import CocoDetection, CocoFormatError, PadCollate, load_coco
from vitpe.data.det_transforms import DropBoxesWithoutArea, detr_size, eval_transform, train_transform
from vitpe.data.folder import Skipped
from vitpe.engine.coco_eval import STAT_NAMES, coco_evaluate, plot_detections, to_coco_results
from vitpe.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("coco"))


def test_index_maps_ids_keeps_crowd_for_eval_and_drops_zero_boxes(data, caplog) -> None:
    with caplog.at_level(logging.INFO):
        ds = CocoDetection(data, "train2017")
    idx = ds.index
    assert idx.cat_ids == CAT_IDS and ds.label_of == {3: 0, 17: 1, 90: 2}
    assert idx.dropped["zero size"] == 1
    assert "ignored 1 image file(s) the json does not list" in caplog.text
    assert len(ds) == 4  # the image without boxes stays
    crowd = [a for a in idx.gt.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1  # COCOeval sees the crowd region...
    _, target = ds[0]
    assert len(target["labels"]) == 2  # ...the matcher does not
    _, empty = ds[3]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_targets_are_normalised_cxcywh_with_contiguous_labels(data) -> None:
    ds = CocoDetection(data, "train2017")
    image, t = ds[1]  # boxes: class 17 at [5, 6, 20, 14], class 90 at [36, 21, 18, 16] on 64x48
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    torch.testing.assert_close(t["boxes"], torch.tensor([[15 / 64, 13 / 48, 20 / 64, 14 / 48],
                                                         [45 / 64, 29 / 48, 18 / 64, 16 / 48]]))
    assert t["labels"].tolist() == [1, 2] and int(t["image_id"]) == 101 and t["orig_size"].tolist() == [48, 64]


def test_flip_and_resize_move_boxes_with_the_image(data) -> None:
    ds = CocoDetection(data, "train2017", train_transform(96, 200, flip=1.0, multiscale=False, crop_prob=0.0))
    image, t = ds[1]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32  # 2x, normalised
    # a horizontal flip mirrors cx and keeps the rest
    torch.testing.assert_close(t["boxes"][:, 0], 1 - torch.tensor([15 / 64, 45 / 64]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t["boxes"][:, 1:], torch.tensor([[13 / 48, 20 / 64, 14 / 48],
                                                                [29 / 48, 18 / 64, 16 / 48]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w, size, max_size, expected", [
    (427, 640, 480, 1333, (480, 719)),   # the shorter side exactly the size, the longer floored
    (200, 1000, 800, 1333, (267, 1335)),  # capped: the shorter side rounded from the cap, as DETR
    (612, 612, 640, None, (640, 640)), (640, 427, 480, None, (719, 480)), (480, 640, 480, 1333, (480, 640))])
def test_output_sizes_are_detrs(h, w, size, max_size, expected) -> None:
    assert detr_size(h, w, size, max_size) == expected
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    assert tuple(eval_transform(size, max_size or 10 ** 6)(image).shape[-2:]) == expected


def test_boxes_touching_the_edges_survive_flip_and_every_training_scale() -> None:
    """A resize scales box coordinates by a float32 ratio: an edge at the image's border can land
    a rounding step past it, and must be clamped back, not dropped."""
    t = train_transform(800, 1333, flip=0.5, crop_prob=0.0)
    image = tv_tensors.Image(torch.zeros(3, 427, 640, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[600, 400, 640, 427], [0, 0, 10, 427], [0.5, 3, 0.9, 9]], format="XYXY",
                                     canvas_size=(427, 640))
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out = t(image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3])})
        assert out["labels"].tolist() == [1, 2, 3], seed  # the 0.4 px wide box too
        h, w = out_image.shape[-2:]
        assert (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()


def test_only_boxes_without_area_are_dropped_with_their_labels() -> None:
    image = tv_tensors.Image(torch.zeros(3, 20, 20, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[2, 2, 2, 9], [1, 1, 1.2, 5], [3, 4, 8, 4]], format="XYXY", canvas_size=(20, 20))
    _, out = DropBoxesWithoutArea()(image, {"boxes": boxes, "labels": torch.tensor([5, 6, 7])})
    assert out["labels"].tolist() == [6] and isinstance(out["boxes"], tv_tensors.BoundingBoxes)


def test_random_crop_keeps_boxes_inside_and_drops_emptied_ones(data) -> None:
    ds = CocoDetection(data, "train2017", train_transform(48, 80, flip=0.0, crop_prob=1.0))
    for seed in range(8):
        torch.manual_seed(seed)
        image, t = ds[1]
        b = t["boxes"]
        assert len(b) == len(t["labels"]) <= 2
        assert ((b[:, :2] - b[:, 2:] / 2) >= -1e-6).all() and ((b[:, :2] + b[:, 2:] / 2) <= 1 + 1e-6).all()
        assert (b[:, 2:] > 0).all()


def test_pad_collate_pads_bottom_right_to_the_divisor_and_hands_on_skipped_items() -> None:
    lost = Skipped("x/bad.jpg", "cannot decode image x/bad.jpg")
    items = [(torch.ones(3, 40, 50), {"id": 0}), lost, (torch.ones(3, 33, 70), {"id": 1})]
    images, mask, targets, skipped = PadCollate(32)(items)
    assert images.shape == (2, 3, 64, 96) and [t["id"] for t in targets] == [0, 1] and skipped == [lost]
    assert (~mask[0]).sum() == 40 * 50 and (~mask[0, :40, :50]).all() and images[0, :, 40:].abs().sum() == 0
    assert (~mask[1, :33, :70]).all() and mask[1, 33:].all()
    empty = PadCollate(32)([lost])
    assert len(empty.images) == len(empty.mask) == 0 and empty.targets == [] and empty.skipped == [lost]


def perfect_predictions(ds: CocoDetection) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The dataset's own (non-crowd) boxes as predictions with score 1, and their image ids."""
    preds, ids = [], []
    for i in range(len(ds)):
        _, t = ds.raw(i)
        preds.append({"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"],
                      "scores": torch.ones(len(t["labels"]))})
        ids.append(ds.samples[i][0]["id"])
    return preds, ids


def test_perfect_predictions_score_ap_one_through_the_id_mapping(tmp_path) -> None:
    """Predictions made from the dataset's contiguous labels, mapped back with ``cat_ids``: AP is 1
    only if the mapping round-trips (the crowd region is ignored by COCOeval, not a miss; the json
    has no zero-size box, which no prediction can match)."""
    ds = CocoDetection(make_dataset(tmp_path, 1, 4, zero_box=False), "val2017")
    preds, ids = perfect_predictions(ds)
    results = to_coco_results(preds, ids, ds.index.cat_ids)
    assert {r["category_id"] for r in results} <= set(CAT_IDS)
    m = coco_evaluate(ds.index.gt, results)
    assert len(m["stats"]) == len(STAT_NAMES) == 12
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    shifted = to_coco_results(preds, ids, [CAT_IDS[1], CAT_IDS[2], CAT_IDS[0]])  # a wrong mapping
    assert coco_evaluate(ds.index.gt, shifted)["AP"] == pytest.approx(0.0)


def test_no_detection_at_all_scores_what_cocoeval_gives(data) -> None:
    """``loadRes`` refuses an empty list; an empty result set scores 0 where there is ground truth
    and -1 where an area range has none (every box here is small), not 0 everywhere."""
    m = coco_evaluate(CocoDetection(data, "val2017").index.gt, [])
    assert m["stats"] == [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]
    assert m["APm"] == -1.0 and "Average Precision" in m["summary"]


def test_detections_are_scored_as_predicted_not_rounded() -> None:
    """Scores rounded to 5 decimals tie 0.699996 and 0.700004, and COCOeval orders tied scores by
    their place in the list: a false positive (first in the list) would rank above a true positive
    and AP drop from 0.835 to 0.667. Boxes keep every digit too."""
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)], "categories": [{"id": 1}],
                  "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                                   "iscrowd": 0} for i in (1, 2)]}
    gt.createIndex()
    preds = [{"boxes": torch.tensor([[60.0, 60.0, 90.0, 90.0], [10.0, 10.0, 50.0, 50.0]]),  # miss, hit
              "labels": torch.tensor([0, 0]), "scores": torch.tensor([0.699996, 0.6])},
             {"boxes": torch.tensor([[10.004, 10.0, 50.0, 50.0]]), "labels": torch.tensor([0]),
              "scores": torch.tensor([0.700004])}]
    results = to_coco_results(preds, [1, 2], [1])
    assert [r["score"] for r in results] == [float(torch.tensor(s)) for s in (0.699996, 0.6, 0.700004)]
    assert results[2]["bbox"][0] == float(torch.tensor(10.004))
    # the hit at 0.700004, the miss, the hit at 0.6: precision 1 up to recall 0.5, 2/3 up to 1
    assert coco_evaluate(gt, results)["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_eval_transform_is_a_pure_rescale(data) -> None:
    ds = CocoDetection(data, "val2017", eval_transform(96, 1000))
    image, t = ds[1]
    assert tuple(image.shape[-2:]) == (96, 128) and t["size"].tolist() == [96, 128]
    _, raw = CocoDetection(data, "val2017")[1]
    torch.testing.assert_close(t["boxes"], raw["boxes"], atol=1e-5, rtol=0)  # normalised: unchanged


def test_plot_detections_writes_a_png(data, tmp_path) -> None:
    ds = CocoDetection(data, "val2017")
    image, truth = ds.raw(0)
    pred = {"boxes": truth["boxes"].as_subclass(torch.Tensor), "labels": truth["labels"],
            "scores": torch.tensor([0.9, 0.3])}
    plot_detections([(image.as_subclass(torch.Tensor), truth, pred)], ds.index.class_names, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


# -- bad files -------------------------------------------------------------------------------
def _rewrite(data, split: str, edit) -> None:
    path = data / "annotations" / f"instances_{split}.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@pytest.fixture
def fresh(tmp_path):
    return make_dataset(tmp_path, 2, 2)


def _load(root, on_error="error"):
    return load_coco(root / "annotations" / "instances_train2017.json", root / "train2017", on_error)


def test_a_json_that_is_not_coco_names_the_missing_key(fresh) -> None:
    _rewrite(fresh, "train2017", lambda d: d.pop("annotations"))
    with pytest.raises(CocoFormatError, match=r"instances_train2017.json: not a COCO file: missing key 'annotations'"):
        _load(fresh)
    (fresh / "annotations" / "instances_train2017.json").write_text("[1, 2")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        _load(fresh)


@pytest.mark.parametrize("edit,match,reason", [
    (lambda d: d["annotations"][0].update(image_id=999), "names unknown image id 999", "unknown image"),
    (lambda d: d["annotations"][0].update(category_id=5), "names unknown category id 5", "unknown category"),
    (lambda d: d["annotations"][0].update(bbox=[50.0, 10.0, 30.0, 10.0]), r"reaches outside image 100 \(0000.jpg, 64x48\)",
     "outside image"),
    # COCOeval compares these as numbers: a string or null would stop it after an epoch of training
    (lambda d: d["annotations"][0].update(area="big"), r"area 'big' is not a non-negative number", "bad iscrowd or area"),
    (lambda d: d["annotations"][0].update(area=None), r"area None is not", "bad iscrowd or area"),
    (lambda d: d["annotations"][0].update(iscrowd="no"), r"iscrowd 'no' is not 0 or 1", "bad iscrowd or area"),
    (lambda d: d["annotations"][0].update(bbox=[True, 10, 20, 20]), r"is not \[x, y, width, height\]", "bad bbox"),
    # a segmentation without its box (or an entry without ids): nothing to learn or score
    (lambda d: d["annotations"][0].pop("bbox"), r"annotation \S+ has no 'bbox' \(set data.on_error=skip", "missing keys"),
    (lambda d: d["annotations"][0].pop("image_id"), r"has no 'image_id'", "missing keys"),
])
def test_bad_annotations_error_or_skip_by_option(fresh, edit, match, reason) -> None:
    _rewrite(fresh, "train2017", edit)
    with pytest.raises(CocoFormatError, match=match):
        _load(fresh)
    index = _load(fresh, "skip")
    assert index.dropped[reason] == 1
    assert len(index.annotations) == 3 + 2 - 1  # image 0: 2 + crowd, image 1: 2; one dropped, zero-size gone


@pytest.mark.parametrize("edit", [lambda a: a.update(area="big"), lambda a: a.pop("bbox"),
                                  lambda a: a.pop("category_id")])
def test_an_annotation_cocoeval_cannot_compare_is_left_out_of_the_ground_truth_under_skip(fresh, edit) -> None:
    _rewrite(fresh, "train2017", lambda d: edit(d["annotations"][1]))
    index = _load(fresh, "skip")
    kept = [a for a in index.gt.dataset["annotations"]]
    assert all(isinstance(a["area"], (int, float)) and "bbox" in a and "category_id" in a for a in kept)
    assert len(kept) == len(index.source["annotations"]) - 1  # only that one
    from vitpe.engine.coco_eval import coco_evaluate
    assert coco_evaluate(index.gt, [])["AP"] == 0.0  # COCOeval runs on it


def test_box_within_a_pixel_of_the_edge_is_clipped(fresh) -> None:
    _rewrite(fresh, "train2017", lambda d: d["annotations"][0].update(bbox=[50.0, 10.0, 14.5, 10.0]))
    box = _load(fresh).annotations[0]["bbox"]
    assert box == [50.0, 10.0, 14.0, 10.0]


def test_boxes_past_the_edge_are_clipped_with_clip_boxes_as_detr_does(fresh, caplog) -> None:
    """Image 100 is 64x48. A box 16 px past its right edge is an error by default, naming the option;
    with ``clip_boxes`` it is clipped and counted, and only a box with nothing left inside is bad."""
    _rewrite(fresh, "train2017", lambda d: d["annotations"][0].update(bbox=[50.0, 10.0, 30.0, 10.0]))
    with pytest.raises(CocoFormatError, match=r"reaches outside image 100 .*data.clip_boxes=true"):
        _load(fresh)
    path = fresh / "annotations" / "instances_train2017.json"
    with caplog.at_level(logging.INFO):
        index = load_coco(path, fresh / "train2017", clip_boxes=True)
    assert index.annotations[0]["bbox"] == [50.0, 10.0, 14.0, 10.0] and index.clipped == 1
    assert "outside image" not in index.dropped and "clipped 1 to their image" in caplog.text
    _rewrite(fresh, "train2017", lambda d: d["annotations"][1].update(bbox=[70.0, 10.0, 5.0, 5.0]))
    with pytest.raises(CocoFormatError, match=r"annotation 2: bbox \[70.0, 10.0, 5.0, 5.0\] lies wholly outside image"):
        load_coco(path, fresh / "train2017", clip_boxes=True)
    index = load_coco(path, fresh / "train2017", "skip", clip_boxes=True)
    assert index.dropped["outside image"] == 1 and index.clipped == 1


def test_a_crowd_box_past_the_edge_is_clipped_without_complaint(fresh) -> None:
    """Crowd regions are never trained on; COCOeval scores them from the json as it is."""
    _rewrite(fresh, "train2017", lambda d: d["annotations"][2].update(bbox=[2.0, 30.0, 24.0, 30.0]))
    index = _load(fresh)
    crowd = [a for a in index.annotations if a["iscrowd"]]
    assert [a["bbox"] for a in crowd] == [[2.0, 30.0, 24.0, 18.0]]
    assert index.clipped == 0 and dict(index.dropped) == {"zero size": 1}


def test_missing_image_file_errors_or_is_skipped(fresh, caplog) -> None:
    (fresh / "train2017" / "0001.jpg").unlink()
    with pytest.raises(CocoFormatError, match="0001.jpg does not exist"):
        _load(fresh)
    with caplog.at_level(logging.INFO):
        index = _load(fresh, "skip")
    assert len(index.images) == 1
    assert "1 of the json's 2 images left out of training and evaluation" in caplog.text
    # its boxes go with it, counted apart from annotations that name an image the json lacks
    assert index.dropped == {"missing file": 1, "of a left-out image": 2, "zero size": 1}
    assert "unknown image" not in caplog.text


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["annotations"][0].update(image_id="100"), "names unknown image id '100'"),
    (lambda d: d["annotations"][0].update(category_id="3"), r"names unknown category id '3' \(known: \[3, 17, 90\]\)"),
    (lambda d: d["images"][0].update(width="64"), r"image 100 \(0000.jpg\) has width '64': expected a positive whole"),
    (lambda d: d["images"][1].update(height=0), r"image 101 \(0001.jpg\) has height 0"),
    (lambda d: d["images"][0].update(file_name=5), r"image 100 has file_name 5: expected the image's file name"),
    (lambda d: d["images"][0].update(file_name=None), r"image 100 has file_name None"),
])
def test_ids_and_sizes_of_the_wrong_kind_are_named_as_they_are(fresh, edit, match) -> None:
    """An id given as a string where the json's are numbers reads as such in the message."""
    _rewrite(fresh, "train2017", edit)
    with pytest.raises(CocoFormatError, match=match):
        _load(fresh)


def test_unreadable_image_errors_or_is_skipped(fresh) -> None:
    """A truncated JPEG or a json size that disagrees with the pixels shows only when the image is
    read: a ``DataError`` naming the file, or with ``on_error=skip`` a ``Skipped`` (also when cached)
    that ``PadCollate`` leaves out of the batch."""
    truncate(fresh / "train2017" / "0001.jpg")
    with pytest.raises(DataError, match=r"cannot decode image .*0001.jpg: image file is truncated.*on_error=skip"):
        CocoDetection(fresh, "train2017")[1]
    for cache in (False, True):
        ds = CocoDetection(fresh, "train2017", on_error="skip", cache=cache)
        lost = ds[1]
        assert isinstance(lost, Skipped) and lost.path.endswith("0001.jpg") and "truncated" in lost.reason
        batch = PadCollate(32)([ds[0], lost])
        assert len(batch.images) == 1 and batch.targets[0]["image_id"] == 100 and batch.skipped == [lost]
    _rewrite(fresh, "train2017", lambda d: d["images"][0].update(width=80))
    lost = CocoDetection(fresh, "train2017", on_error="skip")[0]
    assert isinstance(lost, Skipped) and "0000.jpg is 64x48 but instances_train2017.json says 80x48" in lost.reason


def test_string_image_ids_through_targets_evaluation_and_results(tmp_path) -> None:
    """pycocotools takes image ids that are strings: targets and results carry them unchanged and
    COCOeval scores them as it scores numbers."""
    root = make_dataset(tmp_path, 2, 4, zero_box=False, str_ids=True)
    _, target = CocoDetection(root, "train2017")[1]
    assert target["image_id"] == "img-101"
    ds = CocoDetection(root, "val2017")
    preds, ids = perfect_predictions(ds)
    results = to_coco_results(preds, ids, ds.index.cat_ids)
    assert {r["image_id"] for r in results} == {"img-100", "img-101", "img-102"}  # img-103 has no box
    assert coco_evaluate(ds.index.gt, results, ids)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["images"][0].update(id=[1]), r"image .* has id \[1\]: ids are numbers or strings"),
    (lambda d: d["annotations"][0].update(image_id={"a": 1}), r"annotation .* has image_id \{'a': 1\}"),
    (lambda d: d["images"][1].update(id="b"),
     r"image ids mix kinds that cannot be ordered \(100 \(int\), 'b' \(str\)\)"),
])
def test_ids_that_cannot_be_looked_up_or_ordered_are_named(fresh, edit, match) -> None:
    _rewrite(fresh, "train2017", edit)
    for on_error in ("error", "skip"):
        with pytest.raises(CocoFormatError, match=match):
            _load(fresh, on_error)


def test_image_size_disagreeing_with_json_is_named(fresh) -> None:
    _rewrite(fresh, "train2017", lambda d: d["images"][0].update(width=80))
    from vitpe.errors import DataError

    with pytest.raises(DataError, match="0000.jpg is 64x48 but instances_train2017.json says 80x48"):
        CocoDetection(fresh, "train2017")[0]
    # width and height swapped, as a json written from the image turned by its EXIF orientation
    _rewrite(fresh, "train2017", lambda d: d["images"][0].update(width=48, height=64))
    with pytest.raises(DataError, match=r"says 48x64 \(width and height swapped: .*EXIF orientation"):
        CocoDetection(fresh, "train2017", clip_boxes=True)[0]  # (its boxes would reach past the json's size)


def test_an_image_without_width_and_height_takes_them_from_its_file(fresh, caplog) -> None:
    """pycocotools does not need them, and some converters leave them out."""
    def drop(d):
        for k in ("width", "height"):
            d["images"][0].pop(k)
        d["images"][1].pop("height")
    _rewrite(fresh, "train2017", drop)
    with caplog.at_level("INFO", logger="vitpe.data.coco_index"):
        index = _load(fresh)
    assert [(img["width"], img["height"]) for img in index.images] == [(64, 48), (64, 48)]
    assert "2 image(s) without width and height in the json took them from their files" in caplog.text
    assert len(CocoDetection(fresh, "train2017")[0]) == 2  # decoded, and its size agrees
    (fresh / "train2017" / "0000.jpg").write_bytes(b"not an image")
    with pytest.raises(CocoFormatError, match=r"0000.jpg is not an image \(and the json gives no width and height"):
        _load(fresh)
    assert _load(fresh, "skip").dropped["unreadable image"] == 1


def test_an_image_over_pils_pixel_limit_without_width_and_height_is_named_for_that(fresh, monkeypatch) -> None:
    """PIL refuses to open an image over twice ``Image.MAX_IMAGE_PIXELS``: that is the reason given,
    not that the file is no image."""
    from PIL import Image

    _rewrite(fresh, "train2017", lambda d: [d["images"][0].pop(k) for k in ("width", "height")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64x48 images are over twice it
    with pytest.raises(CocoFormatError, match=r"0000.jpg cannot be read \(DecompressionBombError: Image size"):
        _load(fresh)


def test_tv_tensor_boxes_before_transform(data) -> None:
    image, t = CocoDetection(data, "train2017").raw(0)
    assert isinstance(image, tv_tensors.Image) and isinstance(t["boxes"], tv_tensors.BoundingBoxes)
    assert t["boxes"].canvas_size == (48, 64)


def test_annotation_ids_of_zero_or_repeated_do_not_lower_ap(tmp_path) -> None:
    """pycocotools treats a ground-truth id of 0 as unmatched and repeated ids as one box: the loader
    renumbers them, so perfect predictions still score AP 1."""
    root = make_dataset(tmp_path / "coco", zero_box=False)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        a["id"] = 0 if a is data["annotations"][0] else 5
    path.write_text(json.dumps(data))
    ds = CocoDetection(root, "val2017")
    ids = [a["id"] for a in ds.index.gt.dataset["annotations"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    preds, image_ids = perfect_predictions(ds)
    m = coco_evaluate(ds.index.gt, to_coco_results(preds, image_ids, ds.index.cat_ids))
    assert m["AP"] == pytest.approx(1.0)


# -- audit against real COCO files --------------------------------------------------------------
def test_image_without_boxes_is_counted_in_the_log(data, caplog) -> None:
    with caplog.at_level(logging.INFO):
        load_coco(data / "annotations" / "instances_train2017.json", data / "train2017")
    assert "4 images (1 without boxes to learn, kept)" in caplog.text


def test_box_clipped_to_nothing_is_dropped_from_training_but_scored_as_in_the_json(tmp_path) -> None:
    """A box within the one-pixel tolerance but wholly past the edge used to be kept with a negative
    width, a target the matcher cannot use: training drops it, as a zero-size box. COCOeval scores
    against every box of the json as it is, as pycocotools run on the file does."""
    root = make_dataset(tmp_path, 1, 2, empty=None)
    _rewrite(root, "val2017", lambda d: d["annotations"].extend([
        dict(d["annotations"][0], id=98, bbox=[64.2, 10.0, 0.5, 5.0]),  # image 64 wide
        dict(d["annotations"][0], id=99, bbox=[-0.9, 10.0, 0.5, 5.0])]))
    ds = CocoDetection(root, "val2017")
    assert ds.index.dropped["zero size"] == 1 + 2
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in ds.index.annotations)
    raw = json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
    assert [a["bbox"] for a in ds.index.gt.dataset["annotations"]] == [a["bbox"] for a in raw]


def test_nan_in_a_bbox_is_a_bad_box_not_a_nan_target(fresh) -> None:
    """json.loads reads ``NaN``; every comparison with it is false, so it used to pass the checks."""
    _rewrite(fresh, "train2017", lambda d: d["annotations"][0].update(bbox=[float("nan"), 10.0, 5.0, 5.0]))
    with pytest.raises(CocoFormatError, match=r"bbox \[nan, 10.0, 5.0, 5.0\] is not \[x, y, width, height\]"):
        _load(fresh)
    assert _load(fresh, "skip").dropped["bad bbox"] == 1


def test_image_modes_exif_subfolders_and_unreadable_files(tmp_path, caplog) -> None:
    """Grayscale, CMYK and palette files come out RGB; EXIF orientation is not applied (COCO's json
    sizes and boxes are of the stored pixels, as pycocotools and DETR read them), and a json that
    gives the rotated size is named; an unreadable file is named."""
    from PIL import Image

    from vitpe.errors import DataError

    root = make_dataset(tmp_path, 1, 1, empty=None)
    (root / "train2017" / "sub" / "dir").mkdir(parents=True)
    red = (255, 0, 0)
    files = {"sub/dir/gray.jpg": Image.new("L", (64, 48), 200),
             "cmyk.jpg": Image.new("CMYK", (64, 48), (0, 255, 255, 0)),
             "pal.png": Image.new("RGB", (64, 48), red).convert("P"), "exif.jpg": Image.new("RGB", (64, 48), red)}
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show upright"
    for name, im in files.items():
        im.save(root / "train2017" / name, **({"exif": exif} if name == "exif.jpg" else {}))
    (root / "train2017" / "bad.jpg").write_bytes(b"not an image")
    _rewrite(root, "train2017", lambda d: d["images"].extend(
        dict(d["images"][0], id=200 + k, file_name=f) for k, f in enumerate([*files, "bad.jpg"])))
    Image.new("RGB", (8, 8)).save(root / "train2017" / "sub" / "unlisted.png")
    with caplog.at_level(logging.INFO):
        ds = CocoDetection(root, "train2017")
    # listed files in sub-folders are matched by their path, unlisted ones found there too (with the
    # one that make_dataset leaves at the top)
    assert "ignored 2 image file(s) the json does not list" in caplog.text
    decoded = {ds.samples[i][0]["file_name"]: ds.decode(i) for i in range(1, 5)}
    assert all(x.shape == (3, 48, 64) for x in decoded.values())
    assert decoded["sub/dir/gray.jpg"][:, 0, 0].tolist() == [200] * 3
    for name in ("cmyk.jpg", "pal.png", "exif.jpg"):
        r, g, b = decoded[name][:, 24, 32].tolist()
        assert r > 240 and g < 15 and b < 15, name
    with pytest.raises(DataError, match="cannot decode image .*bad.jpg"):
        ds[5]
    _rewrite(root, "train2017", lambda d: d["images"][4].update(width=48, height=64))  # json of the upright image
    with pytest.raises(DataError, match="exif.jpg is 64x48 but instances_train2017.json says 48x64"):
        CocoDetection(root, "train2017")[4]


class _Replay(torch.nn.Module):
    """A stand-in for DETR that returns prepared outputs, batch after batch, in the loader's order."""

    def __init__(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs, self.step = outputs, 0

    def forward(self, images, mask):
        logits, boxes = zip(*self.outputs[self.step:self.step + len(images)])
        self.step += len(images)
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}


def test_evaluation_path_matches_pycocotools_on_the_original_file(tmp_path, caplog) -> None:
    """``predict`` + ``to_coco_results`` + ``coco_evaluate`` (via ``evaluate``) on a resized input
    against pycocotools run directly on the json as written, with the detections in original pixels,
    over the images that exist. The json's zero-size box, a box half a pixel past the edge and one
    far past it (``on_error=skip``), which training drops or clips, are scored as they are; the
    image whose file is missing is left out of the evaluated images, and the log says so. Exact
    predictions of every box score what pycocotools says (below 1: nothing matches a zero-size
    box), and so do shifted ones with a detection on the crowd region (ignored) and one on the
    image without boxes (a false positive)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torch.utils.data import DataLoader

    from vitpe.engine.detection import evaluate

    root = make_dataset(tmp_path, 1, 5)
    _rewrite(root, "val2017", lambda d: d["annotations"].extend([  # images 64x48
        dict(d["annotations"][0], id=90, image_id=101, bbox=[50.0, 10.0, 14.5, 10.0], area=145.0),  # clipped
        dict(d["annotations"][0], id=91, image_id=102, bbox=[50.0, 30.0, 30.0, 10.0], area=300.0)]))  # dropped
    (root / "val2017" / "0004.jpg").unlink()
    ann_file = root / "annotations" / "instances_val2017.json"
    raw = json.loads(ann_file.read_text())
    W, H = 64, 48
    ds = CocoDetection(root, "val2017", eval_transform(96, 1000), on_error="skip")  # inputs 2x the original size
    assert ds.index.dropped == {"zero size": 1, "outside image": 1, "missing file": 1, "of a left-out image": 2}

    def run(dets: dict[int, list[tuple[int, list[float], float]]]) -> tuple[dict, list[dict]]:
        """``dets``: image id -> (category id, xywh in original pixels, score); returns our metrics
        and the result entries for pycocotools."""
        Q, C = 5, len(CAT_IDS)
        outputs, expected = [], []
        for img in ds.index.images:
            logits, boxes = torch.full((Q, C + 1), -float("inf")), torch.tensor([[0.5, 0.5, 0.25, 0.25]] * Q)
            logits[:, C] = 0.0  # unused queries: "no object", score 0 for every class
            expected += [{"image_id": img["id"], "category_id": CAT_IDS[0], "bbox": [24.0, 18.0, 16.0, 12.0],
                          "score": 0.0}] * (Q - len(dets.get(img["id"], [])))
            for q, (cat, (x, y, w, h), score) in enumerate(dets.get(img["id"], [])):
                probs = [score if c == cat else (1 - score) / C for c in [*CAT_IDS, None]]
                logits[q] = torch.tensor(probs).log()
                boxes[q] = torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
                expected.append({"image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h], "score": score})
            outputs.append((logits, boxes))
        loader = DataLoader(ds, batch_size=3, collate_fn=PadCollate(32))
        return evaluate(_Replay(outputs), loader, ds, torch.device("cpu"), amp=False, gather=False), expected

    def pycocotools_stats(results: list[dict]) -> list[float]:
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = [img["id"] for img in raw["images"] if (root / "val2017" / img["file_name"]).is_file()]
        ev.evaluate(), ev.accumulate(), ev.summarize()
        return list(ev.stats)

    truth = [a for a in raw["annotations"] if not a["iscrowd"]]
    perfect = {}
    for k, a in enumerate(truth):
        perfect.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"], 0.9 - 0.04 * k))
    with caplog.at_level(logging.INFO):
        ours, expected = run(perfect)
    want = pycocotools_stats(expected)
    assert 0.5 < want[0] < 0.99  # the zero-size box is a miss
    assert ours["stats"] == pytest.approx(want, abs=1e-6)
    assert ours["images"] == 4 and "4 of the json's 5 images evaluated, 1 left out" in caplog.text

    shifted = {i: [(c, [x + 3.0, y, w, h], s) for c, (x, y, w, h), s in v] for i, v in perfect.items()}
    crowd = next(a for a in raw["annotations"] if a["iscrowd"])
    shifted[crowd["image_id"]].append((crowd["category_id"], crowd["bbox"], 0.95))  # on the crowd: ignored
    empty = next(img["id"] for img in raw["images"] if img["id"] not in {a["image_id"] for a in raw["annotations"]})
    shifted[empty] = [(CAT_IDS[1], [10.0, 10.0, 20.0, 20.0], 0.93)]  # on the image without boxes: a miss-fire
    ours, expected = run(shifted)
    want = pycocotools_stats(expected)
    assert 0.1 < want[0] < 0.9  # shifted by 3 px: hits at low IoU thresholds only
    assert ours["stats"] == pytest.approx(want, abs=1e-6)


def test_category_names_that_differ_between_the_splits_are_named(tmp_path, caplog) -> None:
    from vitpe.engine.detection import DetDataConfig, build_datasets

    root = make_dataset(tmp_path, 2, 2)
    _rewrite(root, "val2017", lambda d: d["categories"][0].update(name="renamed"))
    with caplog.at_level("WARNING"):
        build_datasets(DetDataConfig(path=str(root)))
    assert "category names differ between train2017 and val2017" in caplog.text and "'renamed'" in caplog.text


def test_a_validation_json_with_some_of_the_training_categories_is_read_in_the_training_label_space(
        tmp_path, caplog) -> None:
    """Some exporters write each split's own categories: a validation json without one of the
    training categories (and without its boxes) keeps the training labels, its detections go out
    with the training ids, and perfect predictions still score AP 1. A validation category the
    training split lacks is an error naming it."""
    from vitpe.engine.detection import DetDataConfig, build_datasets

    root = make_dataset(tmp_path, 2, 4, zero_box=False)

    def drop_first(d):
        d["categories"] = [c for c in d["categories"] if c["id"] != CAT_IDS[0]]
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] != CAT_IDS[0]]

    _rewrite(root, "val2017", drop_first)
    with caplog.at_level("INFO"):
        train, val = build_datasets(DetDataConfig(path=str(root)))
    assert "lists 2 of train2017's 3 categories" in caplog.text
    assert val.cat_ids == train.cat_ids == CAT_IDS and val.class_names == train.class_names
    assert val.index.cat_ids == CAT_IDS[1:]
    labels = torch.cat([val.raw(i)[1]["labels"] for i in range(len(val))])
    assert set(labels.tolist()) == {1, 2}  # the training split's labels of categories 17 and 90
    preds, ids = perfect_predictions(val)
    results = to_coco_results(preds, ids, val.cat_ids)
    assert {r["category_id"] for r in results} == set(CAT_IDS[1:])
    assert coco_evaluate(val.index.gt, results)["AP"] == pytest.approx(1.0)
    _rewrite(root, "val2017", lambda d: d["categories"].append({"id": 42, "name": "new"}))
    with pytest.raises(DataError, match=r"categories of val2017 \[42\] are not in train2017's"):
        build_datasets(DetDataConfig(path=str(root)))
