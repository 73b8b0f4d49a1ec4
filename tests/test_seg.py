"""Segmentation: metrics against a hand-made confusion matrix, inference modes, augmentation,
bad masks and images (with and without the cache), the heads, the figure, and short runs of
train_seg.py on datasets made here (bad images skipped, a failed validation resumed)."""
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitpe  # noqa: F401
from vitpe.config import ConfigError
from vitpe.data.seg_transforms import augment_batch, normalize
from vitpe.data.segmentation import SegmentationDataset
from vitpe.engine.seg_metrics import (confusion_matrix, metrics_from_confusion, predict, slide_logits,
                                      slide_windows)
from vitpe.errors import DataError
from vitpe.engine.segmentation import IMAGENET_MEAN, IMAGENET_STD
from vitpe.models.segmentor import build_segmentor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_seg.py lives at the repository root


# -- metrics ---------------------------------------------------------------------------------
def from_confusion(conf: list[list[int]], ignored: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label and prediction pixels realising ``conf`` (rows true, columns predicted), plus ignored pixels."""
    target, pred = [], []
    for t, row in enumerate(conf):
        for p, n in enumerate(row):
            target += [t] * n
            pred += [p] * n
    target += [255] * ignored
    pred += [1] * ignored
    perm = torch.randperm(len(target))
    return torch.tensor(pred)[perm], torch.tensor(target)[perm]


def test_miou_matches_a_hand_computed_confusion_matrix():
    conf = [[5, 1, 0, 0],   # class 0: 5 right, 1 taken for class 1
            [2, 3, 1, 0],   # class 1
            [0, 0, 0, 0],   # class 2: never in the labels, predicted once -> IoU 0, Acc undefined
            [0, 0, 0, 0]]   # class 3: nowhere -> left out of every mean
    pred, target = from_confusion(conf, ignored=8)
    got = confusion_matrix(pred.reshape(4, 5), target.reshape(4, 5), 4)
    assert got.tolist() == conf  # the 8 ignored pixels count nowhere
    m = metrics_from_confusion(got, ["a", "b", "c", "d"])
    iou = [5 / (6 + 7 - 5), 3 / (6 + 4 - 3), 0 / (0 + 1 - 0)]
    assert m["per_class"]["a"]["IoU"] == pytest.approx(100 * iou[0])
    assert m["per_class"]["b"]["IoU"] == pytest.approx(100 * iou[1])
    assert m["per_class"]["c"]["IoU"] == 0 and math.isnan(m["per_class"]["c"]["Acc"])
    assert math.isnan(m["per_class"]["d"]["IoU"])
    assert m["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert m["mAcc"] == pytest.approx(100 * (5 / 6 + 3 / 6) / 2)
    assert m["aAcc"] == pytest.approx(100 * 8 / 12)


def test_perfect_prediction_and_bad_labels():
    target = torch.randint(0, 5, (20, 20))
    m = metrics_from_confusion(confusion_matrix(target, target, 5))
    assert m["mIoU"] == pytest.approx(100) and m["aAcc"] == pytest.approx(100)
    with pytest.raises(ValueError, match=r"outside 0..4"):
        confusion_matrix(target, torch.full_like(target, 7), 5)


# -- inference -------------------------------------------------------------------------------
def test_slide_windows_cover_the_image_within_bounds():
    """Every stride up to the window covers every pixel, the last window flush with the border
    (mmseg), images smaller than the window too; a larger stride, which would leave pixels
    without logits (class 0 after argmax), is an error naming the keys, before any training."""
    cases = [((360, 480), 256, 170), ((100, 90), 256, 170), ((257, 256), 256, 256)]
    cases += [((h, h + 3), crop, stride) for h in range(1, 30) for crop in (1, 5, 8, 16)
              for stride in range(1, crop + 1)]
    for size, crop, stride in cases:
        covered = torch.zeros(size, dtype=torch.int)
        windows = slide_windows(size, crop, stride)
        for y0, y1, x0, x1 in windows:
            assert 0 <= y0 < y1 <= size[0] and 0 <= x0 < x1 <= size[1] and y1 - y0 <= crop and x1 - x0 <= crop
            assert y1 - y0 == min(crop, size[0]) and x1 - x0 == min(crop, size[1])  # full windows only
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1, (size, crop, stride)
        assert max(w[1] for w in windows) == size[0] and max(w[3] for w in windows) == size[1]
    with pytest.raises(ValueError, match="stride 40"):
        slide_windows((56, 56), 16, 40)
    with pytest.raises(ValueError, match="stride 40"):
        predict(torch.nn.Conv2d(3, 2, 1), torch.randn(1, 3, 56, 56), "slide", crop=16, stride=40)


def test_train_seg_refuses_a_stride_larger_than_the_window_before_training(tmp_path, capsys):
    import train_seg
    from vitpe.cli import run_cli
    from vitpe.engine.segmentation import SegConfig, slide_settings

    cfg = SegConfig()
    cfg.data.crop_size, cfg.eval.slide_stride = 32, 24
    assert slide_settings(cfg) == (32, 24)
    cfg.eval.slide_crop = 16
    with pytest.raises(ConfigError, match="'eval.slide_stride': the stride 24 is larger than the window 16"):
        slide_settings(cfg)
    root = make_dataset(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        run_cli(train_seg.main, ["--data", str(root), "--device", "cpu", "--output", str(tmp_path / "run"),
                                 "--set", "eval.slide_crop=16", "--set", "eval.slide_stride=40"])
    assert e.value.code == 2 and "eval.slide_stride" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # stopped before training
    # sizes of 0 are named by their own key (a window of 0 used to mean "the training crop"); the
    # classifier's data.img_size, which segmentation inherits, would be ignored: it is refused
    for setting, named in (("eval.slide_crop=0", "'eval.slide_crop'"), ("data.crop_size=0", "'data.crop_size'"),
                           ("data.img_size=48", "set data.crop_size=48 instead")):
        with pytest.raises(SystemExit) as e:
            run_cli(train_seg.main, ["--data", str(root), "--device", "cpu", "--output", str(tmp_path / "run"),
                                     "--set", setting])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and named in err and len(err.splitlines()) == 1, (setting, err)


def test_train_seg_help_leaves_out_eval_sizes_and_the_option_points_to_eval_scales(capsys):
    import train_seg
    from vitpe.cli import run_cli

    with pytest.raises(SystemExit):
        train_seg.parse(["--help"])
    shown = capsys.readouterr().out
    assert "--eval-scales" in shown and "--eval-sizes" not in shown
    with pytest.raises(SystemExit) as e:
        run_cli(train_seg.main, ["--eval-sizes", "32", "--device", "cpu"])
    assert e.value.code == 2 and "--eval-scales" in capsys.readouterr().err


def test_slide_and_whole_agree_for_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)  # no spatial context: windows cannot change any logit
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        whole = predict(model, x, "whole")
        assert torch.allclose(slide_logits(model, x, 32, 20), whole, atol=1e-5)
        assert torch.allclose(predict(model, x, "slide", crop=32, stride=20), whole, atol=1e-5)
        assert predict(model, x, "whole", 1.5).shape == whole.shape


# -- data ------------------------------------------------------------------------------------
def blocks_pair(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured blocks whose red channel is 60 * class, and its mask (with an ignored strip)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for c in (1, 2):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y: y + h // 2, x: x + w // 2] = c
    image = np.stack([mask * 60, np.full_like(mask, 90), 200 - mask * 50], axis=-1).astype(np.uint8)
    mask[:, :2] = 255
    return image, mask


def make_dataset(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (40, 56)) -> Path:
    for split, n in [("training", n_train), ("validation", n_val)]:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = blocks_pair(*size, seed=i + (100 if split == "validation" else 0))
            Image.fromarray(image).save(root / "images" / split / f"img{i}.png")
            Image.fromarray(mask).save(root / "annotations" / split / f"img{i}.png")
    (root / "classes.json").write_text(json.dumps(["ground", "red", "blue"]))
    return root


def test_dataset_reads_the_layout(tmp_path):
    ds = SegmentationDataset(make_dataset(tmp_path), "training", 0, cache=True)
    assert ds.classes == ["ground", "red", "blue"] and len(ds) == 4
    image, mask = ds[0]
    assert image.shape == (3, 40, 56) and image.dtype == torch.uint8 and mask.shape == (40, 56)
    assert set(torch.unique(mask).tolist()) <= {0, 1, 2, 255}


def read_all(ds: SegmentationDataset) -> list:
    """Every item, as the training loop and the evaluation take them: a ``Skipped`` is the error
    naming its file (``on_error='error'``), or dropped and recorded in ``ds.skipped``."""
    from vitpe.engine.segmentation import drop_skipped

    found = []
    items = drop_skipped([ds[i] for i in range(len(ds))], ds.on_error, found, set())
    ds.record_skipped(found)
    return items


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("fault", ["size", "turned", "missing", "values", "rgb"])
def test_bad_masks_name_the_file_or_are_skipped(tmp_path, fault, cache, caplog):
    """Headers are checked when the dataset is built; label values when the masks are decoded:
    then too with ``cache``, else when an item is read, the same error or skip either way."""
    root = make_dataset(tmp_path)
    ann = root / "annotations" / "training" / "img1.png"
    if fault == "size":
        Image.fromarray(np.zeros((30, 56), np.uint8)).save(ann)
    elif fault == "turned":  # drawn on the image as turned by its EXIF orientation
        Image.fromarray(np.zeros((56, 40), np.uint8)).save(ann)
    elif fault == "missing":
        ann.unlink()
    elif fault == "values":
        Image.fromarray(np.full((40, 56), 7, np.uint8)).save(ann)
    else:
        Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(ann)
    expected = {"size": "30 but image img1.png is 56x40", "missing": "no mask", "values": r"label values \[7\]",
                "rgb": "mode RGB", "turned": "is 40x56 but image img1.png is 56x40 .width and height swapped.*EXIF"}[fault]
    with pytest.raises(DataError, match=expected) as info:
        read_all(SegmentationDataset(root, "training", 3, cache=cache))
    assert "img1.png" in str(info.value) and "on_error=skip" in str(info.value)
    ds = SegmentationDataset(root, "training", 3, on_error="skip", cache=cache)
    assert len(read_all(ds)) == 3 and len(ds.skipped) == 1 and "img1" in ds.skipped[0].path
    if cache or fault != "values":
        assert "skipped 1 of 4" in caplog.text


def test_without_cache_no_mask_is_decoded_when_the_dataset_is_built(tmp_path, monkeypatch):
    """ADE20K's 20k training masks are not decoded (nor held) up front unless ``cache`` asks."""
    from vitpe.data import segmentation

    root = make_dataset(tmp_path)

    def no_decoding(*args):
        raise AssertionError("a mask was decoded")

    monkeypatch.setattr(segmentation, "read_mask", no_decoding)
    ds = SegmentationDataset(root, "training", 3)
    assert len(ds) == 4 and not hasattr(ds, "masks")
    monkeypatch.undo()
    assert ds[1][1].shape == (40, 56)


def test_reduce_zero_label(tmp_path):
    root = make_dataset(tmp_path)
    Image.fromarray(np.array([[0, 1, 2, 3]] * 4, np.uint8)).save(root / "annotations" / "validation" / "img0.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "validation" / "img0.png")
    ds = SegmentationDataset(root, "validation", 3, reduce_zero_label=True)
    assert ds[0][1][0].tolist() == [255, 0, 1, 2]


def save_pair(root: Path, rel: str, value: int, ext: str = ".jpg", size: tuple[int, int] = (6, 8)) -> None:
    """An image ``images/training/<rel><ext>`` and its mask ``annotations/training/<rel>.png``, all ``value``."""
    for path, array in [(root / "images" / "training" / f"{rel}{ext}", np.zeros((*size, 3), np.uint8)),
                        (root / "annotations" / "training" / f"{rel}.png", np.full(size, value, np.uint8))]:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


def test_layout_reads_sub_folders_and_passes_over_hidden_files(tmp_path):
    """mmseg lists the split recursively, masks at the same relative path, hidden files passed over:
    an image in a sub-folder is not dropped silently, and macOS's ``._x.jpg`` does not stop the run."""
    save_pair(tmp_path, "a", 0)
    save_pair(tmp_path, "B", 1, ext=".PNG")
    save_pair(tmp_path, "scene1/a", 2)  # same stem as a.jpg, other folder: its own mask
    images = tmp_path / "images" / "training"
    (images / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (images / "._a.jpg").write_bytes(b"\0\5\x16\7Mac OS X")  # AppleDouble, no mask
    (images / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (images / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(images / ".thumbnails" / "a.jpg")
    ds = SegmentationDataset(tmp_path, "training", 3)
    assert [str(p.relative_to(images)) for p in ds.images] == ["B.PNG", "a.jpg", "scene1/a.jpg"]
    assert [int(mask.unique()) for _, mask in read_all(ds)] == [1, 0, 2] and not ds.skipped


def test_two_images_sharing_a_mask_are_an_error(tmp_path):
    save_pair(tmp_path, "a", 1)
    save_pair(tmp_path, "a", 1, ext=".png")  # a.jpg and a.png: both would be scored against a.png
    with pytest.raises(DataError, match=r"a\.jpg: its mask .*annotations/training/a\.png is also the mask of a\.png"):
        SegmentationDataset(tmp_path, "training", 3)
    save_pair(tmp_path, "b", 2)
    ds = SegmentationDataset(tmp_path, "training", 3, on_error="skip")  # neither is kept: the mask may be a.png's
    assert [p.name for p in ds.images] == ["b.jpg"] and sorted(Path(k.path).name for k in ds.skipped) == \
        ["a.jpg", "a.png"]


def test_unreadable_mask_names_the_mask_not_the_image(tmp_path):
    save_pair(tmp_path, "a", 1, size=(40, 56))
    mask = tmp_path / "annotations" / "training" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (40, 56)).astype(np.uint8)).save(mask)
    mask.write_bytes(mask.read_bytes()[:300])  # truncated: the header reads, the pixels do not
    with pytest.raises(DataError, match="unreadable mask") as info:
        SegmentationDataset(tmp_path, "training", 3, cache=True)
    assert str(info.value).startswith(f"{mask}: ")
    with pytest.raises(DataError, match="unreadable mask") as info:
        read_all(SegmentationDataset(tmp_path, "training", 3))
    assert str(info.value).startswith(f"{mask}: ")


def truncate_image(root: Path, split: str, stem: str) -> Path:
    """Replace ``images/<split>/<stem>.png`` by a JPEG cut short: its header reads, its pixels do not."""
    png, buf = root / "images" / split / f"{stem}.png", io.BytesIO()
    with Image.open(png) as im:
        im.save(buf, "JPEG")
    png.unlink()
    jpg = png.with_suffix(".jpg")
    jpg.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 4])
    return jpg


@pytest.mark.parametrize("cache", [True, False])
def test_an_image_that_cannot_be_decoded_names_the_file_or_is_skipped(tmp_path, cache):
    """A truncated image passes the header check; decoding it, when the dataset is built (cache)
    or when it is read, stops naming it or, with on_error=skip, drops and records it."""
    root = make_dataset(tmp_path)
    bad = truncate_image(root, "training", "img2")
    with pytest.raises(DataError, match="cannot decode image") as info:
        read_all(SegmentationDataset(root, "training", 3, cache=cache))
    assert str(bad) in str(info.value) and "on_error=skip" in str(info.value)
    ds = SegmentationDataset(root, "training", 3, on_error="skip", cache=cache)
    assert len(read_all(ds)) == 3 and [s.path for s in ds.skipped] == [str(bad)]


@pytest.mark.parametrize("cache", [True, False])
def test_an_image_over_pils_pixel_limit_names_the_file_or_is_skipped(tmp_path, monkeypatch, cache):
    """PIL refuses to open an image over twice ``Image.MAX_IMAGE_PIXELS`` with its own exception
    (not an OSError), which names no file: it is a bad pair like any unreadable one."""
    root = make_dataset(tmp_path)
    image, mask = blocks_pair(80, 112, seed=9)
    Image.fromarray(image).save(root / "images" / "training" / "img1.png")
    Image.fromarray(mask).save(root / "annotations" / "training" / "img1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 80x112 is over twice it, 40x56 under it
    with pytest.raises(DataError, match="exceeds limit") as info:
        read_all(SegmentationDataset(root, "training", 3, cache=cache))
    assert "img1.png" in str(info.value) and "on_error=skip" in str(info.value)
    ds = SegmentationDataset(root, "training", 3, on_error="skip", cache=cache)
    assert len(read_all(ds)) == 3 and len(ds.skipped) == 1 and "img1.png" in ds.skipped[0].path


def test_evaluate_leaves_out_and_records_images_that_cannot_be_decoded(tmp_path, caplog):
    from vitpe.engine.segmentation import evaluate

    root = make_dataset(tmp_path, n_train=0, n_val=3)
    bad = truncate_image(root, "validation", "img1")
    model = torch.nn.Conv2d(3, 3, 1)
    ds = SegmentationDataset(root, "validation", 3, on_error="skip")
    conf = evaluate(model, ds, torch.device("cpu"), amp=False)
    labelled = sum(int((item[1] != 255).sum()) for item in (ds[0], ds[2]))
    assert int(conf["whole"]["1.0"].sum()) == labelled and [s.path for s in ds.skipped] == [str(bad)]
    assert str(bad) in caplog.text and "skipped 1 unreadable" in caplog.text
    with pytest.raises(DataError, match="cannot decode image") as info:
        evaluate(model, SegmentationDataset(root, "validation", 3), torch.device("cpu"), amp=False)
    assert str(info.value).startswith(f"{bad}: ")


def test_an_ignore_index_that_is_a_class_is_an_error(tmp_path):
    """255 with more than 255 classes (ADE20K-full: 847, 16-bit masks) or 0 where 0 is a class
    would drop that class from training and scoring silently; under reduce_zero_label the stored
    value K is class K-1."""
    save_pair(tmp_path, "a", 1)
    with pytest.raises(ConfigError, match=r"'data.ignore_index': 255 is also one of the 300 classes \(0..299\).*"
                                          r"--ignore-index"):
        SegmentationDataset(tmp_path, "training", 300)
    with pytest.raises(ConfigError, match=r"0 is also one of the 3 classes \(0..2\)"):
        SegmentationDataset(tmp_path, "training", 3, ignore_index=0)
    with pytest.raises(ConfigError, match="3 is also the stored value of class 2 under reduce_zero_label"):
        SegmentationDataset(tmp_path, "training", 3, ignore_index=3, reduce_zero_label=True)
    assert len(SegmentationDataset(tmp_path, "training", 300, ignore_index=65535)) == 1
    assert len(SegmentationDataset(tmp_path, "training", 3, ignore_index=3)) == 1
    assert len(SegmentationDataset(tmp_path, "training", 3, ignore_index=-1, reduce_zero_label=True)) == 1


@pytest.mark.parametrize("value", [151, 256])
def test_reduce_zero_label_errors_quote_the_stored_values(tmp_path, value):
    """With 150 classes stored 1..150, a stored 151 is reported as 151 (not the shifted 150), and a
    stored 256, which the shift would turn into the ignore index 255 unseen, is an error too; a
    stored 255 is the ignore index itself."""
    save_pair(tmp_path, "a", 0, size=(1, 5))
    mask = tmp_path / "annotations" / "training" / "a.png"
    Image.fromarray(np.array([[0, 1, 150, 255, 1]], np.uint16)).save(mask)
    ds = SegmentationDataset(tmp_path, "training", 150, reduce_zero_label=True)
    assert ds[0][1].tolist() == [[255, 0, 149, 255, 0]]
    Image.fromarray(np.array([[0, 1, 150, 255, value]], np.uint16)).save(mask)
    for cache in (True, False):
        with pytest.raises(DataError, match=rf"label values \[{value}\] are not 0 \(other\), 1..150 \(classes "
                                            rf"0..149 under reduce_zero_label\)") as info:
            read_all(SegmentationDataset(tmp_path, "training", 150, reduce_zero_label=True, cache=cache))
        assert str(info.value).startswith(f"{mask}: ")


def test_masks_stored_from_one_name_reduce_zero_label(tmp_path):
    """ADE20K's masks read without reduce_zero_label: the top class, stored one up, is out of
    range, and the message names the option."""
    save_pair(tmp_path, "a", 0, size=(1, 3))
    Image.fromarray(np.array([[0, 1, 150]], np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match=r"label values \[150\] are not classes 0..149 .*reduce_zero_label=true"):
        read_all(SegmentationDataset(tmp_path, "training", 150))
    Image.fromarray(np.array([[0, 1, 151]], np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    with pytest.raises(DataError, match=r"label values \[151\]") as info:
        read_all(SegmentationDataset(tmp_path, "training", 150))
    assert "reduce_zero_label" not in str(info.value)


def test_test_time_scales_resize_as_mmseg():
    """mmcv rounds halves up (2.5 -> 3, where Python's round gives 2) and cv2's bilinear resize does
    not antialias when shrinking."""
    import torch.nn.functional as F

    seen = []

    def model(x):
        seen.append(x)
        return x

    image = torch.rand(1, 3, 5, 9)
    predict(model, image, scale=0.5)
    assert seen[0].shape[-2:] == (3, 5)
    torch.testing.assert_close(seen[0], F.interpolate(image, size=(3, 5), mode="bilinear", align_corners=False))


def test_the_decoder_width_defaults_to_segformers():
    from vitpe.engine.segmentation import SegModelConfig, head_width

    assert [head_width(SegModelConfig(name=f"vitpe_mit_b{i}")) for i in range(6)] == [256, 256, 768, 768, 768, 768]
    assert head_width(SegModelConfig(name="vitpe_vit_tiny_patch16_224")) == 256
    assert head_width(SegModelConfig(name="vitpe_mit_b2", head_dim=128)) == 128


def test_ade20ks_object_info_names_the_classes(tmp_path):
    from vitpe.data.segmentation import read_classes

    save_pair(tmp_path, "a", 0)
    rows = ["Idx\tRatio\tTrain\tVal\tName", "2\t0.1\t10\t1\tbuilding, edifice", "1\t0.2\t20\t2\twall",
            "3\t0.05\t5\t1\tsky"]
    (tmp_path / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    assert read_classes(tmp_path, 3) == ["wall", "building", "sky"]
    assert read_classes(tmp_path, 0) == ["wall", "building", "sky"]  # no --num-classes: the file's count
    assert read_classes(tmp_path, 4) == ["class_0", "class_1", "class_2", "class_3"]  # another class count
    (tmp_path / "classes.json").write_text('["a", "b", "c"]')
    assert read_classes(tmp_path, 3) == ["a", "b", "c"]  # classes.json first


def test_a_class_name_given_twice_is_named(tmp_path):
    """Per-class results are keyed by name: a repeated name would hide one class's figures."""
    from vitpe.data.segmentation import read_classes

    save_pair(tmp_path, "a", 0)
    (tmp_path / "classes.json").write_text('["road", "car", "road"]')
    with pytest.raises(DataError, match=r"classes\.json: class names must differ.*'road' at \[0, 2\]"):
        read_classes(tmp_path, 0)


def test_an_empty_classes_json_says_so(tmp_path):
    save_pair(tmp_path, "a", 0)
    (tmp_path / "classes.json").write_text("[]")
    with pytest.raises(DataError, match=r"classes\.json lists no classes"):
        SegmentationDataset(tmp_path, "training", 0)


def test_palette_and_16_bit_masks_give_class_indices(tmp_path):
    """A 'P' mask is read as its palette indices, not its colours; 16-bit masks keep their values."""
    labels = np.array([[0, 1, 2, 255]] * 2, np.uint8)
    save_pair(tmp_path / "p", "p", 0, size=(2, 4))
    palette = Image.fromarray(labels, "L").convert("P")
    palette.putpalette([200, 10, 10, 5, 5, 5, 90, 90, 90] + [7] * 759)  # colours unlike the indices
    palette.save(tmp_path / "p" / "annotations" / "training" / "p.png")
    save_pair(tmp_path / "w", "w", 0, size=(2, 4))
    Image.fromarray(np.where(labels == 255, 255, labels + 1).astype(np.uint16)).save(
        tmp_path / "w" / "annotations" / "training" / "w.png")  # mode I;16, ADE20K-style 1-based
    assert SegmentationDataset(tmp_path / "p", "training", 3)[0][1].tolist() == labels.tolist()
    wide = SegmentationDataset(tmp_path / "w", "training", 3, reduce_zero_label=True)
    assert wide[0][1].tolist() == labels.tolist()


def test_evaluate_pools_the_dataset_at_label_resolution(tmp_path):
    """Confusion matrices sum pixels over all images (mmseg's mIoU, not a mean of per-image IoUs), at
    each label's own size (odd sizes, scales and windows that do not divide it), ignored pixels nowhere."""
    from vitpe.engine.segmentation import evaluate

    root = make_dataset(tmp_path, n_train=1, n_val=0)
    save_pair(root, "odd", 1, size=(13, 17))
    ds = SegmentationDataset(root, "training", 3)
    model = torch.nn.Conv2d(3, 3, 1)  # pointwise: whole, slide and the scales all see the same pixels
    conf = evaluate(model, ds, torch.device("cpu"), amp=False, modes=("whole", "slide"), scales=(0.7, 1.0),
                    crop=12, stride=7)
    expected = sum(confusion_matrix(predict(model, normalize(img, IMAGENET_MEAN, IMAGENET_STD)[None])[0].argmax(0),
                                    mask.long(), 3) for img, mask in ds)
    labelled = sum(int((mask != 255).sum()) for _, mask in ds)
    assert torch.equal(conf["whole"]["1.0"], expected) and torch.equal(conf["slide"]["1.0"], expected)
    for per in conf.values():
        assert {k: int(c.sum()) for k, c in per.items()} == {"0.7": labelled, "1.0": labelled, "ms": labelled}


def test_multi_scale_fuses_only_the_listed_scales(tmp_path):
    """mmseg fuses exactly the test scales it is given; scale 1.0, scored alone for the headline,
    joins the fusion only when listed."""
    from vitpe.engine.segmentation import evaluate

    ds = SegmentationDataset(make_dataset(tmp_path, n_train=2, n_val=0), "training", 3)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)  # sees neighbours: each scale predicts differently
    conf = evaluate(model, ds, torch.device("cpu"), amp=False, scales=(0.5, 1.0, 1.5), fuse=(0.5, 1.5))
    assert set(conf["whole"]) == {"0.5", "1.0", "1.5", "ms"}
    expected = 0
    with torch.no_grad():
        for image, mask in ds:
            x = normalize(image, IMAGENET_MEAN, IMAGENET_STD)[None]
            fused = sum(predict(model, x, scale=s).softmax(1) for s in (0.5, 1.5))
            expected = expected + confusion_matrix(fused[0].argmax(0), mask.long(), 3)
    assert torch.equal(conf["whole"]["ms"], expected)
    with pytest.raises(ValueError, match="not all among the scales"):
        evaluate(model, ds, torch.device("cpu"), amp=False, scales=(1.0,), fuse=(0.5, 1.0))


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    ds = SegmentationDataset(make_dataset(tmp_path), "training", 3, cache=True)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    torch.manual_seed(1)
    x, y = augment_batch([ds[i] for i in range(4)] * 4, 48, (0.5, 2.0), 0.5, mean, std, 255, torch.device("cpu"))
    assert x.shape == (16, 3, 48, 48) and y.shape == (16, 48, 48) and y.dtype == torch.long
    red = x[:, 0] * 0.25 * 255 + 0.5 * 255  # back to 0..255
    labelled = y != 255
    agree = (torch.round(red / 60) == y) & labelled
    assert agree.sum() / labelled.sum() > 0.95  # only pixels on block borders can disagree
    same = augment_batch([ds[0]], 64, (1.0, 1.0), 0.0, mean, std, 255, torch.device("cpu"))
    assert torch.allclose(same[0][0, :, :40, :56], normalize(ds[0][0], mean, std), atol=1e-4)
    assert (same[1][0, 40:] == 255).all() and torch.equal(same[1][0, :40, :56], ds[0][1].long())


def test_base_size_fits_each_image_as_mmseg_resizes_with_keep_ratio(tmp_path):
    """``data.base_size`` (mmseg's img_scale (2048, 512)): the longer side at most 2048, the shorter
    at most 512, one of them reached; training's random scale and evaluation's scales apply to the
    fitted size; the config refuses sizes that are not positive."""
    from vitpe.config import ConfigError, from_dict
    from vitpe.data.seg_transforms import base_scale
    from vitpe.engine.segmentation import SegDataConfig, evaluate

    assert base_scale((512, 683), (2048, 512)) == 1.0
    assert base_scale((256, 341), (2048, 512)) == 2.0  # small images grow
    assert base_scale((1000, 3000), (512, 2048)) == 0.512  # the order of the two sizes does not matter
    assert base_scale((100, 5000), (2048, 512)) == 2048 / 5000  # the longer side's limit binds
    assert base_scale((7, 9), None) == 1.0
    assert from_dict(SegDataConfig, {"base_size": [2048, 512]}).base_size == (2048, 512)
    with pytest.raises(ConfigError, match="data.base_size"):
        from_dict(SegDataConfig, {"base_size": [2048, 0]})

    ds = SegmentationDataset(make_dataset(tmp_path, n_train=2, n_val=0), "training", 3, cache=True)  # 40 x 56
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x, y = augment_batch([ds[0]], 64, (1.0, 1.0), 0.0, mean, std, 255, torch.device("cpu"), base_size=(80, 20))
    assert (y[0] != 255).nonzero().amax(0).tolist() == [19, 27]  # fitted to 20 x 28: factor 0.5
    torch.manual_seed(0)
    a = augment_batch([ds[0]], 64, (0.5, 2.0), 0.0, mean, std, 255, torch.device("cpu"), base_size=(80, 20))[1]
    torch.manual_seed(0)
    b = augment_batch([ds[0]], 64, (0.25, 1.0), 0.0, mean, std, 255, torch.device("cpu"))[1]
    assert torch.equal(a, b)  # a random scale r of the fitted size is r / 2 of the original one

    model = torch.nn.Conv2d(3, 3, 3, padding=1)  # sees neighbours: the scale changes the prediction
    fitted = evaluate(model, ds, torch.device("cpu"), amp=False, scales=(0.5, 1.0), base_size=(80, 20))
    plain = evaluate(model, ds, torch.device("cpu"), amp=False, scales=(0.25, 0.5))
    assert torch.equal(fitted["whole"]["1.0"], plain["whole"]["0.5"])
    assert torch.equal(fitted["whole"]["0.5"], plain["whole"]["0.25"])
    assert not torch.equal(fitted["whole"]["1.0"], evaluate(model, ds, torch.device("cpu"), amp=False)["whole"]["1.0"])


def test_cat_max_ratio_redraws_crops_one_class_fills():
    """mmseg's RandomCrop(cat_max_ratio=0.75): a crop one class covers is redrawn up to 10 times, so
    the rare class reaches far more crops; the default draws once (the same crops as before)."""
    from vitpe.data.seg_transforms import scale_crop

    image = torch.zeros(3, 8, 64)
    mask = torch.zeros(8, 64, dtype=torch.long)
    mask[:, :6] = 1  # class 1 in the first 6 of 64 columns
    mask[:, -4:] = 255  # ignored pixels count for no class

    def mixed(ratio: float, seed: int) -> bool:
        gen = torch.Generator().manual_seed(seed)
        lab = scale_crop(image, mask, 8, 1.0, False, gen, cat_max_ratio=ratio)[1]
        counts = torch.bincount(lab[lab != 255].flatten(), minlength=2)
        return bool(counts.min() > 0 and counts.max() < 0.75 * counts.sum())

    once = sum(mixed(1.0, s) for s in range(200))
    redrawn = sum(mixed(0.75, s) for s in range(200))
    assert once < 20 and redrawn > 3 * once  # about 4 of 57 windows qualify: 7 % once, about half redrawn
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(scale_crop(image, mask, 8, 1.0, False, gen_a)[1],
                       scale_crop(image, mask, 8, 1.0, False, gen_b, cat_max_ratio=1.0)[1])


@pytest.mark.parametrize("num_classes,count", [(11, 4), (150, 1), (150, 2)])
def test_prediction_figure_colours_differ_and_the_legend_overlaps_no_panel(tmp_path, monkeypatch, num_classes, count):
    """Every class its own colour (ADE20K's 150, ADE20K-full's 847), none near the black of ignored
    pixels; the legend (here of all 150 classes: random labels) in a band below the panels."""
    import matplotlib.pyplot as plt

    from vitpe.engine.seg_plot import palette, plot_segmentation

    for k in (11, 150, 847):
        colours = np.round(palette(k) * 255)
        assert len(np.unique(colours, axis=0)) == k and colours.max(1).min() >= 120
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    gen = torch.Generator().manual_seed(0)
    samples = [(torch.zeros(3, 30, 40, dtype=torch.uint8), torch.randint(0, num_classes, (30, 40), generator=gen),
                torch.randint(0, num_classes, (30, 40), generator=gen)) for _ in range(count)]
    plot_segmentation(samples, [f"class {i}" for i in range(num_classes)], tmp_path / "p.png", "title")
    monkeypatch.undo()
    [fig] = figures
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert len(fig.legends[0].get_texts()) == num_classes + 1 and legend.y0 >= 0
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes if ax.get_images())
    plt.close(fig)


# -- heads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("vitpe_mit_b0", dict(pos="peg")),
                                     ("vitpe_vit_tiny_patch16_224", dict(pos="rope_axial", depth=2))])
def test_segmentors_give_logits_at_any_input_size(name, kw):
    m = build_segmentor(name, 5, img_size=64, head_dim=32, **kw)
    x = torch.randn(2, 3, 45, 70)  # no multiple of 32 nor of 16
    out = m(x)
    assert out.shape == (2, 5, 45, 70)
    out.sum().backward()
    assert m.decode_head.classifier.weight.grad.abs().sum() > 0


def test_segformer_checkpoint_loads_into_the_segmentor():
    from test_mit_convert import B0, nvlabs_state_dict

    from vitpe.models.mit_convert import convert_segformer_state_dict
    backbone = {f"backbone.{k}": v for k, v in nvlabs_state_dict(**B0).items() if not k.startswith("head.")}
    m = build_segmentor("vitpe_mit_b0", 150)
    head = {k.replace("decode_head.", ""): v for k, v in m.decode_head.state_dict().items()}
    mmseg = {**backbone, **{f"decode_head.linear_c{i + 1}.proj.{p}": head[f"linear_c.{i}.proj.{p}"]
                            for i in range(4) for p in ("weight", "bias")},
             "decode_head.linear_fuse.conv.weight": head["fuse.weight"],
             **{f"decode_head.linear_fuse.bn.{p}": head[f"norm.{p}"] for p in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
             "decode_head.linear_pred.weight": head["classifier.weight"],
             "decode_head.linear_pred.bias": head["classifier.bias"]}
    m.load_state_dict(convert_segformer_state_dict({"state_dict": mmseg}))  # strict: every key placed


# -- the training script -----------------------------------------------------------------------
def test_train_seg_two_iterations(tmp_path, capsys):
    import train_seg

    root = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data", str(root), "--crop-size", "32", "--batch-size", "2", "--epochs", "1", "--device", "cpu",
            "--output", str(out), "--eval-scales", "0.5,1.5", "--lr", "1e-3",
            "--set", "model.kwargs={embed_dims: [8, 16, 40, 64]}", "--set", "model.head_dim=16",
            "--set", "eval.figure_images=2", "--set", "data.photometric=true"]
    assert train_seg.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"mIoU", "aAcc", "mAcc", "per_class", "scales"} <= results.keys()
    assert set(results["per_class"]) == {"ground", "red", "blue"}
    assert set(results["scales"]) == {"whole", "slide"}
    assert set(results["scales"]["whole"]) == {"0.5", "1.0", "1.5", "ms"} and results["ms_scales"] == [0.5, 1.5]
    assert results["mIoU"] == results["scales"]["whole"]["1.0"]["mIoU"]  # the headline: scale 1.0, not fused
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "val_mIoU" in json.loads(lines[0])
    for f in ("checkpoint.pt", "config.yaml", "predictions.png"):
        assert (out / f).is_file()
    assert "| whole | 1.0 |" in capsys.readouterr().out
    # a finished run, resumed with other scales into another folder: trains nothing, evaluates again
    before = (out / "checkpoint.pt").read_bytes()
    assert train_seg.main(["--resume", str(out / "checkpoint.pt"), "--eval-scales", "0.75,2.0",
                           "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert set(again["scales"]["whole"]) == {"0.75", "1.0", "2.0", "ms"}
    assert again["scales"]["whole"]["1.0"] == results["scales"]["whole"]["1.0"]  # the same weights
    assert (out / "checkpoint.pt").read_bytes() == before and not (tmp_path / "again" / "checkpoint.pt").exists()
    # resumed on data whose classes are in another order: the head's outputs would take other names
    import shutil

    other = tmp_path / "data2"
    shutil.copytree(root, other)
    (other / "classes.json").write_text(json.dumps(["ground", "blue", "red"]))
    with pytest.raises(DataError, match=r"data2: its classes are not the checkpoint's .*index 1: 'blue' against 'red'"):
        train_seg.main(["--resume", str(out / "checkpoint.pt"), "--data", str(other), "--output", str(tmp_path / "x")])


def test_train_seg_bad_mask_is_one_line_error(tmp_path, capsys):
    import train_seg
    from vitpe.cli import run_cli

    root = make_dataset(tmp_path / "data")
    Image.fromarray(np.full((40, 56), 9, np.uint8)).save(root / "annotations" / "validation" / "img1.png")
    with pytest.raises(SystemExit) as e:
        run_cli(train_seg.main, ["--data", str(root), "--device", "cpu", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "annotations/validation/img1.png" in err and "label values [9]" in err


TINY = ["--crop-size", "32", "--batch-size", "2", "--device", "cpu", "--set", "model.head_dim=16",
        "--set", "model.kwargs={embed_dims: [8, 16, 40, 64]}", "--set", "eval.modes=[whole]",
        "--set", "eval.figure_images=1"]


def test_train_seg_skips_images_that_cannot_be_decoded(tmp_path):
    """Without the cache, a truncated training or validation image is met when read: with
    on_error=skip it is logged, counted per epoch and listed in results.json, and the run goes on."""
    import train_seg

    root, out = make_dataset(tmp_path / "data", n_train=4, n_val=3), tmp_path / "run"
    bad_train, bad_val = truncate_image(root, "training", "img3"), truncate_image(root, "validation", "img1")
    assert train_seg.main(["--data", str(root), "--epochs", "2", "--output", str(out), "--on-error", "skip",
                           "--set", "data.cache=false", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["path"] for s in results["skipped"]["train"]] == [str(bad_train)]
    assert [s["path"] for s in results["skipped"]["val"]] == [str(bad_val)]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["skipped"] for ln in lines] == [1, 1] and all("val_mIoU" in ln for ln in lines)


def test_a_failing_validation_keeps_the_epoch_and_resume_validates_it(tmp_path, capsys):
    """checkpoint.pt is written before validation: a validation that stops the run (here an image
    that cannot be decoded, with on_error=error) loses no training, and --resume validates that
    epoch first, so metrics.jsonl and best.pt end as in an uninterrupted run."""
    import train_seg
    from vitpe.cli import run_cli
    from vitpe.engine.checkpoint import load_checkpoint

    root, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    good = (root / "images" / "validation" / "img1.png").read_bytes()
    bad = truncate_image(root, "validation", "img1")
    with pytest.raises(SystemExit) as e:
        run_cli(train_seg.main, ["--data", str(root), "--epochs", "2", "--output", str(out),
                                 "--set", "data.cache=false", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad) in err and "cannot decode image" in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["pending_val"]["epoch"] == 0 and not (out / "best.pt").exists()
    bad.unlink()
    (root / "images" / "validation" / "img1.png").write_bytes(good)
    assert train_seg.main(["--resume", str(out / "checkpoint.pt")]) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [0, 1] and all("val_mIoU" in ln for ln in lines)
    assert lines[0]["train_loss"] == state["pending_val"]["train_loss"]  # the interrupted run's training
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["epoch"] == 2 and "pending_val" not in final
    assert final["best_miou"] == max(ln["val_mIoU"] for ln in lines) == load_checkpoint(out / "best.pt")["best_miou"]


def test_mask_dtype_holds_negative_and_large_ignore_indices():
    import torch

    from vitpe.data.segmentation import mask_dtype

    assert mask_dtype(11, 255) == torch.uint8
    for classes, ignore in [(11, -1), (150, -100), (300, 255), (11, 40000)]:
        dtype = mask_dtype(classes, ignore)
        stored = torch.tensor([ignore, classes - 1]).to(dtype)
        assert stored.tolist() == [ignore, classes - 1], (classes, ignore, dtype)


def test_pixel_loss_is_the_labelled_mean_and_zero_without_labels():
    import torch
    import torch.nn.functional as F

    from vitpe.engine.segmentation import pixel_loss

    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = 255
    torch.testing.assert_close(pixel_loss(logits, target, 255), F.cross_entropy(logits, target, ignore_index=255))
    empty = pixel_loss(logits, torch.full((2, 5, 6), 255), 255)
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


def test_train_seg_non_finite_loss_stops_naming_its_step_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss is read on the host every ``run.log_interval`` steps and at the end of an epoch; a
    NaN in between still ends the run before that epoch's checkpoint, naming its step."""
    import train_seg
    from vitpe.cli import run_cli
    from vitpe.engine import segmentation
    from vitpe.engine.checkpoint import load_checkpoint

    real, calls = segmentation.pixel_loss, [0]

    def nan_at_third(*args):  # 2 steps an epoch: epoch 2, step 1
        calls[0] += 1
        return real(*args) * float("nan") if calls[0] == 3 else real(*args)

    monkeypatch.setattr(segmentation, "pixel_loss", nan_at_third)
    root, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_cli(train_seg.main, ["--data", str(root), "--crop-size", "32", "--batch-size", "2", "--epochs", "3",
                                 "--device", "cpu", "--output", str(out), "--set", "run.log_interval=1000",
                                 "--set", "model.kwargs={embed_dims: [8, 16, 40, 64]}", "--set", "model.head_dim=16"])
    assert e.value.code == 2
    assert "non-finite loss (nan) at epoch 2, step 1" in capsys.readouterr().err.strip().splitlines()[-1]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the last good one, intact


def test_photometric_distortion_follows_mmseg():
    import colorsys

    from vitpe.data.seg_transforms import _hsv_to_rgb, _rgb_to_hsv, photometric_distortion

    torch.manual_seed(0)
    x = torch.rand(3, 8, 8) * 255
    hsv = _rgb_to_hsv(x)
    r, g, b = (x[:, 2, 3] / 255).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    assert hsv[:, 2, 3].tolist() == pytest.approx([h * 360, s, v * 255], rel=1e-5)
    torch.testing.assert_close(_hsv_to_rgb(hsv), x, atol=1e-3, rtol=0)
    red = torch.tensor([255.0, 0, 0]).view(3, 1, 1)
    shifted = _rgb_to_hsv(red)
    shifted[0] = (shifted[0] + 120) % 360
    torch.testing.assert_close(_hsv_to_rgb(shifted).flatten(), torch.tensor([0.0, 255, 0]))  # red -> green
    gen = torch.Generator().manual_seed(1)
    grey = torch.full((3, 4, 4), 100.0)
    changed = 0
    for _ in range(200):
        out = photometric_distortion(grey, gen)
        assert out.min() >= 0 and out.max() <= 255
        assert (out[0] - out[1]).abs().max() < 1e-3 and (out[1] - out[2]).abs().max() < 1e-3  # grey stays grey
        changed += not torch.equal(out, grey)
    assert 0.6 < changed / 200 < 0.9  # brightness or contrast drawn: 1 - (1/2 * 1/2) = 3/4
    colour = torch.rand(3, 16, 16, generator=gen) * 255
    hues = [_rgb_to_hsv(photometric_distortion(colour, gen))[0].mean().item() for _ in range(100)]
    assert len({round(h, 3) for h in hues}) > 10  # the hue moves too


def test_head_upsampling_passes_a_map_already_at_size_through_and_resizes_the_others():
    from vitpe.models.segmentor import _upsample

    x = torch.randn(2, 5, 6, 3)  # (B, h, w, C)
    assert _upsample(x, (5, 6), channels_last=True) is x
    nchw = x.permute(0, 3, 1, 2)
    assert _upsample(nchw, torch.Size([5, 6])) is nchw
    up = _upsample(x, (10, 12), channels_last=True)
    ref = torch.nn.functional.interpolate(nchw, size=(10, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1))
