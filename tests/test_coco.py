"""COCO-format data: checks on real-world awkwardness, label mapping, transforms, COCOeval."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from det_data import CAT_IDS, make_dataset
from torchvision import tv_tensors

from vitpe.data.coco import CocoDetection, CocoFormatError, PadCollate, load_coco
from vitpe.data.det_transforms import eval_transform, train_transform
from vitpe.engine.coco_eval import STAT_NAMES, coco_evaluate, plot_detections, to_coco_results


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


def test_random_crop_keeps_boxes_inside_and_drops_emptied_ones(data) -> None:
    ds = CocoDetection(data, "train2017", train_transform(48, 80, flip=0.0, crop_prob=1.0))
    for seed in range(8):
        torch.manual_seed(seed)
        image, t = ds[1]
        b = t["boxes"]
        assert len(b) == len(t["labels"]) <= 2
        assert ((b[:, :2] - b[:, 2:] / 2) >= -1e-6).all() and ((b[:, :2] + b[:, 2:] / 2) <= 1 + 1e-6).all()
        assert (b[:, 2:] > 0).all()


def test_pad_collate_pads_bottom_right_to_the_divisor() -> None:
    items = [(torch.ones(3, 40, 50), {"id": 0}), (torch.ones(3, 33, 70), {"id": 1})]
    images, mask, targets = PadCollate(32)(items)
    assert images.shape == (2, 3, 64, 96) and [t["id"] for t in targets] == [0, 1]
    assert (~mask[0]).sum() == 40 * 50 and (~mask[0, :40, :50]).all() and images[0, :, 40:].abs().sum() == 0
    assert (~mask[1, :33, :70]).all() and mask[1, 33:].all()


def perfect_predictions(ds: CocoDetection) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The dataset's own (non-crowd) boxes as predictions with score 1, and their image ids."""
    preds, ids = [], []
    for i in range(len(ds)):
        _, t = ds.raw(i)
        preds.append({"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"],
                      "scores": torch.ones(len(t["labels"]))})
        ids.append(ds.samples[i][0]["id"])
    return preds, ids


def test_perfect_predictions_score_ap_one_through_the_id_mapping(data) -> None:
    """Predictions made from the dataset's contiguous labels, mapped back with ``cat_ids``: AP is 1
    only if the mapping round-trips (the crowd region is ignored by COCOeval, not a miss)."""
    ds = CocoDetection(data, "val2017")
    preds, ids = perfect_predictions(ds)
    results = to_coco_results(preds, ids, ds.index.cat_ids)
    assert {r["category_id"] for r in results} <= set(CAT_IDS)
    m = coco_evaluate(ds.index.gt, results)
    assert len(m["stats"]) == len(STAT_NAMES) == 12
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    shifted = to_coco_results(preds, ids, [CAT_IDS[1], CAT_IDS[2], CAT_IDS[0]])  # a wrong mapping
    assert coco_evaluate(ds.index.gt, shifted)["AP"] == pytest.approx(0.0)
    assert coco_evaluate(ds.index.gt, [])["AP"] == 0.0


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
])
def test_bad_annotations_error_or_skip_by_option(fresh, edit, match, reason) -> None:
    _rewrite(fresh, "train2017", edit)
    with pytest.raises(CocoFormatError, match=match):
        _load(fresh)
    index = _load(fresh, "skip")
    assert index.dropped[reason] == 1
    assert len(index.annotations) == 3 + 2 - 1  # image 0: 2 + crowd, image 1: 2; one dropped, zero-size gone


def test_box_within_a_pixel_of_the_edge_is_clipped(fresh) -> None:
    _rewrite(fresh, "train2017", lambda d: d["annotations"][0].update(bbox=[50.0, 10.0, 14.5, 10.0]))
    box = _load(fresh).annotations[0]["bbox"]
    assert box == [50.0, 10.0, 14.0, 10.0]


def test_missing_image_file_errors_or_is_skipped(fresh) -> None:
    (fresh / "train2017" / "0001.jpg").unlink()
    with pytest.raises(CocoFormatError, match="0001.jpg does not exist"):
        _load(fresh)
    assert len(_load(fresh, "skip").images) == 1


def test_image_size_disagreeing_with_json_is_named(fresh) -> None:
    _rewrite(fresh, "train2017", lambda d: d["images"][0].update(width=80))
    from vitpe.errors import DataError

    with pytest.raises(DataError, match="0000.jpg is 64x48 but instances_train2017.json says 80x48"):
        CocoDetection(fresh, "train2017")[0]


def test_tv_tensor_boxes_before_transform(data) -> None:
    image, t = CocoDetection(data, "train2017").raw(0)
    assert isinstance(image, tv_tensors.Image) and isinstance(t["boxes"], tv_tensors.BoundingBoxes)
    assert t["boxes"].canvas_size == (48, 64)


def test_annotation_ids_of_zero_or_repeated_do_not_lower_ap(tmp_path) -> None:
    """pycocotools treats a ground-truth id of 0 as unmatched and repeated ids as one box: the loader
    renumbers them, so perfect predictions still score AP 1."""
    root = make_dataset(tmp_path / "coco")
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


def test_box_clipped_to_nothing_is_dropped_and_perfect_ap_stays_one(tmp_path) -> None:
    """A box within the one-pixel tolerance but wholly past the edge used to be kept with a negative
    width: a target the matcher cannot use and a ground truth COCOeval can never match (AP < 1)."""
    root = make_dataset(tmp_path, 1, 2, empty=None)
    _rewrite(root, "val2017", lambda d: d["annotations"].extend([
        dict(d["annotations"][0], id=98, bbox=[64.2, 10.0, 0.5, 5.0]),  # image 64 wide
        dict(d["annotations"][0], id=99, bbox=[-0.9, 10.0, 0.5, 5.0])]))
    ds = CocoDetection(root, "val2017")
    assert ds.index.dropped["zero size"] == 1 + 2
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in ds.index.annotations)
    preds, ids = perfect_predictions(ds)
    assert coco_evaluate(ds.index.gt, to_coco_results(preds, ids, ds.index.cat_ids))["AP"] == pytest.approx(1.0)


def test_nan_in_a_bbox_is_a_bad_box_not_a_nan_target(fresh) -> None:
    """json.loads reads ``NaN``; every comparison with it is false, so it used to pass the checks."""
    _rewrite(fresh, "train2017", lambda d: d["annotations"][0].update(bbox=[float("nan"), 10.0, 5.0, 5.0]))
    with pytest.raises(CocoFormatError, match=r"bbox \[nan, 10.0, 5.0, 5.0\] is not \[x, y, width, height\]"):
        _load(fresh)
    assert _load(fresh, "skip").dropped["bad bbox"] == 1


def test_image_modes_exif_subfolders_and_unreadable_files(tmp_path) -> None:
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
    ds = CocoDetection(root, "train2017")
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


def test_evaluation_path_matches_pycocotools_on_the_original_file(tmp_path) -> None:
    """``predict`` + ``to_coco_results`` + ``coco_evaluate`` (via ``evaluate``) on a resized input
    against pycocotools run directly on the json with the detections written in original pixels:
    a perfect prediction scores AP 1, a shifted one with a detection on the crowd region (ignored)
    and one on the image without boxes (a false positive) scores what pycocotools says."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torch.utils.data import DataLoader

    from vitpe.engine.detection import evaluate

    root = make_dataset(tmp_path, 1, 4)
    _rewrite(root, "val2017", lambda d: d.update(annotations=[a for a in d["annotations"] if a["bbox"][2] > 0]))
    ann_file = root / "annotations" / "instances_val2017.json"
    raw = json.loads(ann_file.read_text())
    W, H = 64, 48
    ds = CocoDetection(root, "val2017", eval_transform(96, 1000))  # inputs 2x the original size

    def run(dets: dict[int, list[tuple[int, list[float], float]]]) -> tuple[dict, list[dict]]:
        """``dets``: image id -> (category id, xywh in original pixels, score); returns our metrics
        and the result entries for pycocotools."""
        Q, C = 4, len(CAT_IDS)
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
        ev.evaluate(), ev.accumulate(), ev.summarize()
        return list(ev.stats)

    truth = [a for a in raw["annotations"] if not a["iscrowd"]]
    perfect = {}
    for k, a in enumerate(truth):
        perfect.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"], 0.9 - 0.05 * k))
    ours, expected = run(perfect)
    assert ours["AP"] == pytest.approx(1.0) and pycocotools_stats(expected)[0] == pytest.approx(1.0)

    shifted = {i: [(c, [x + 3.0, y, w, h], s) for c, (x, y, w, h), s in v] for i, v in perfect.items()}
    crowd = next(a for a in raw["annotations"] if a["iscrowd"])
    shifted[crowd["image_id"]].append((crowd["category_id"], crowd["bbox"], 0.95))  # on the crowd: ignored
    empty = next(img["id"] for img in raw["images"] if img["id"] not in {a["image_id"] for a in raw["annotations"]})
    shifted[empty] = [(CAT_IDS[1], [10.0, 10.0, 20.0, 20.0], 0.93)]  # on the image without boxes: a miss-fire
    ours, expected = run(shifted)
    want = pycocotools_stats(expected)
    assert 0.1 < want[0] < 0.9  # shifted by 3 px: hits at low IoU thresholds only
    assert ours["stats"] == pytest.approx(want, abs=1e-6)
