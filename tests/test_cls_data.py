"""Classification data: folders of any PIL mode, skipped bad files, the in-memory cache, and the
synthetic positional task."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cls_data import make_folder
from vitpe.data.classification import eval_transform
from vitpe.data.folder import CachedImages, ImageFolder, Skipped, collate_skipping, load_rgb
from vitpe.data.synthetic import SyntheticPositions, label_of, render, sample_params
from vitpe.errors import DataError


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    img = Image.new("RGB", (6, 5), (120, 60, 30)).convert(mode) if mode != "I;16" else Image.new(mode, (6, 5), 300)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (6, 5)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_keep_their_colour_as_torchvisions_loader_does(tmp_path, mode):
    img = Image.new("RGBA", (3, 1), (200, 10, 30, 0))
    img.putpixel((1, 0), (255, 255, 255, 255))
    img.putpixel((2, 0), (40, 50, 60, 128))
    if mode == "P":  # a palette with one transparent entry
        img = img.convert("RGB").quantize(3)
        img.info["transparency"] = 0
    elif mode == "LA":
        img = img.convert("LA")
    img.save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png"))
    with Image.open(tmp_path / "a.png") as ref:  # torchvision.datasets.folder.pil_loader
        expected = np.asarray(ref.convert("RGB"))
    assert out.tolist() == expected.tolist()
    assert out[0, 0].tolist() != [0, 0, 0] and (mode == "LA" or out[0, 0].tolist() == [200, 10, 30])


def test_bad_files_are_returned_as_skipped_and_dropped_from_the_batch(tmp_path):
    root = make_folder(tmp_path, per_class=2, val_per_class=1)
    (root / "train" / "red" / "zz_empty.jpg").write_bytes(b"")
    ds = ImageFolder(root, "train", eval_transform(16, (0.5,) * 3, (0.5,) * 3))
    items = [ds[i] for i in range(len(ds))]
    skipped = [it for it in items if isinstance(it, Skipped)]
    assert len(skipped) == 1 and skipped[0].path.endswith("zz_empty.jpg")
    batch = collate_skipping(items)
    assert batch.images.shape == (4, 3, 16, 16) and batch.targets.tolist() == [0, 0, 1, 1]
    assert [s.path for s in batch.skipped] == [skipped[0].path]


class Flaky:
    """A transform that raises on the calls whose number is in ``fails`` (counted from 0)."""

    def __init__(self, fails) -> None:
        self.calls, self.fails = 0, fails

    def __call__(self, img):
        self.calls += 1
        if (self.calls - 1) in self.fails:
            raise ValueError("bits must be between or equal to 1 and 8")
        return torch.from_numpy(np.asarray(img).copy())


@pytest.mark.parametrize("cached", [False, True])
def test_a_transform_that_raises_is_drawn_again_then_its_image_skipped(tmp_path, caplog, cached):
    root = make_folder(tmp_path, per_class=2, val_per_class=1)
    folder = ImageFolder(root, "train")
    ds = CachedImages(folder) if cached else folder
    caplog.set_level("WARNING")
    ds.transform = Flaky({0, 1, 4})  # image 0 fails twice, then passes; image 1 fails once
    items = [ds[i] for i in range(len(ds))]
    assert not any(isinstance(it, Skipped) for it in items) and ds.transform.calls == len(ds) + 3
    assert [it[1] for it in items] == [0, 0, 1, 1]
    assert "drawing it again" in caplog.text and caplog.text.count("bits must be") == 1  # named once
    ds.transform = Flaky(range(1000))  # fails every time: skipped, not raised
    item = ds[2]
    assert isinstance(item, Skipped) and item.path == folder.samples[2][0] and ds.transform.calls == 3
    assert "failed 3 times" in item.reason and "ValueError: bits must be" in item.reason


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "none", "train")
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "a", "train")
    root = make_folder(tmp_path / "b", per_class=1, val_per_class=1)
    with pytest.raises(DataError, match=r"the training split does not have: \['red'\]"):
        ImageFolder(root, "val", classes=["blue", "green"])


def test_a_validation_split_without_a_class_folder_keeps_the_training_indices(tmp_path):
    """A class with no validation folder has no validation images, as one with an empty folder: the
    other classes keep their training index, not their place among the validation folders."""
    root = make_folder(tmp_path, per_class=1, val_per_class=2, classes=("blue", "green", "red"))
    for f in (root / "val" / "blue").iterdir():
        f.unlink()
    (root / "val" / "blue").rmdir()
    val = ImageFolder(root, "val", classes=["blue", "green", "red"])
    assert val.classes == ["blue", "green", "red"]
    assert [(Path(f).parent.name, i) for f, i in val.samples] == [("green", 1)] * 2 + [("red", 2)] * 2


def test_an_empty_class_folder_of_the_training_split_is_named(tmp_path):
    root = make_folder(tmp_path, per_class=1, val_per_class=1)
    (root / "train" / "green").mkdir()
    (root / "train" / "green" / ".DS_Store").write_bytes(b"")  # hidden files are not images
    with pytest.raises(DataError, match=r"class folder\(s\) with no files: \['green'\]"):
        ImageFolder(root, "train")
    (root / "val" / "green").mkdir()  # a class with no validation images is fine
    assert len(ImageFolder(root, "val", classes=["blue", "green", "red"])) == 2


def test_evaluation_names_and_counts_unreadable_images(tmp_path, caplog):
    from vitpe.engine.classification import evaluate

    root = make_folder(tmp_path, per_class=1, val_per_class=2)
    (root / "val" / "red" / "zz_bad.jpg").write_bytes(b"not an image")
    ds = ImageFolder(root, "val", eval_transform(16, (0.5,) * 3, (0.5,) * 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_skipping)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    with caplog.at_level("WARNING"):
        m = evaluate(model, loader, torch.device("cpu"), amp=False, reduce=False)
    assert m["n"] == 4 and m["skipped"] == 1
    assert "zz_bad.jpg" in caplog.text
    for f in (root / "val").rglob("0*.png"):
        f.write_bytes(b"")
    with pytest.raises(DataError, match="none of the 5 images could be read"):
        evaluate(model, loader, torch.device("cpu"), amp=False, reduce=False)


def test_cache_gives_the_same_tensors_as_decoding(tmp_path):
    root = make_folder(tmp_path, per_class=3, val_per_class=1)
    t = eval_transform(24, (0.5,) * 3, (0.5,) * 3)
    folder = ImageFolder(root, "train", t)
    cached = CachedImages(folder)
    assert len(cached) == len(folder) and cached.images.dtype == np.uint8
    for i in range(len(folder)):
        assert torch.equal(cached[i][0], folder[i][0]) and cached[i][1] == folder[i][1]
    other = cached.with_transform(eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    assert other[0][0].shape == (3, 8, 8) and other.images is cached.images  # shared, not copied


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = SyntheticPositions(6, 16, seed=3), SyntheticPositions(6, 16, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(6))
    val = SyntheticPositions(6, 16, seed=3, split="val")
    assert not any(torch.equal(a[i][0], val[i][0]) for i in range(6))
    assert not torch.equal(SyntheticPositions(1, 16, seed=4)[0][0], a[0][0])


def test_synthetic_label_is_the_relative_position():
    labels = [label_of(sample_params(0, i)) for i in range(400)]
    assert set(labels) == {0, 1, 2, 3} and max(np.bincount(labels)) < 0.35 * 400  # balanced, four classes
    p = sample_params(0, 0)
    img = render(p, 64)
    red = (img[0] - img[2]) > 0.3  # the square is red, the disk blue
    ys, xs = torch.nonzero(red, as_tuple=True)
    cx, cy = (xs.float().mean() + 0.5) / 64, (ys.float().mean() + 0.5) / 64
    assert abs(cx - p["square"][0]) < 0.03 and abs(cy - p["square"][1]) < 0.03
    # the label read off the rendered pixels (disk's centroid against the square's) matches the name
    from vitpe.data.synthetic import CLASSES

    for i in range(40):
        p = sample_params(0, i)
        img = render(p, 48, noise=0.0)
        centre = lambda m: torch.nonzero(m).float().mean(0)  # noqa: E731  (row, col)
        sq, disk = centre(img[0] - img[2] > 0.3), centre(img[2] - img[0] > 0.3)
        name = ("right" if disk[1] > sq[1] else "left") + "_" + ("below" if disk[0] > sq[0] else "above")
        assert CLASSES[label_of(p)] == name, (i, name)


def test_synthetic_renders_the_same_scene_at_any_resolution():
    p = sample_params(1, 5)
    big, small = render(p, 64, noise=0.0), render(p, 32, noise=0.0)
    down = F.avg_pool2d(big[None], 2)[0]  # box-filtering the 64-px render approximates the 32-px one
    assert (down - small).abs().mean() < 0.02


def test_evaluation_shards_cover_every_sample_exactly_once():
    from vitpe.engine.loop import ShardSampler

    for size, world in [(10, 3), (7, 2), (2, 4), (0, 2)]:
        seen = sorted(i for r in range(world) for i in ShardSampler(size, r, world))
        assert seen == list(range(size))


def test_a_training_set_smaller_than_one_batch_is_a_named_error():
    import pytest

    from vitpe.engine.loop import make_loader
    from vitpe.errors import DataError

    with pytest.raises(DataError, match=r"data/tiny: 3 training images are fewer than one batch of 4"):
        make_loader(list(range(3)), 4, True, source="data/tiny")
    assert len(make_loader(list(range(3)), 4, False)) == 1  # evaluation keeps the partial batch


@pytest.mark.parametrize("size, batch, world", [(7, 4, 2), (11, 4, 2), (511, 256, 2), (23, 6, 3), (10, 4, 2)])
def test_processes_together_take_the_one_process_batches_and_no_more(size, batch, world, monkeypatch):
    """The global batches of N processes are those of one: as many, with the same images (a
    training set that does not split evenly is not padded with repeated images into an extra step)."""
    from vitpe.engine import loop

    def global_batches(processes: int) -> list[list[int]]:
        shards = []
        for rank in range(processes):
            monkeypatch.setattr(loop.dist, "world_size", lambda: processes)
            monkeypatch.setattr(loop.dist, "rank", lambda: rank)
            loader = loop.make_loader(list(range(size)), batch, True, seed=0)
            loader.sampler.set_epoch(3)
            shards.append([b.tolist() for b in loader])
        return [sorted(i for shard in shards for i in shard[k]) for k in range(len(shards[0]))]

    assert global_batches(world) == [sorted(b) for b in global_batches(1)]


def test_epoch_seeds_depend_on_epoch_and_process_only():
    import torch

    from vitpe.engine.loop import seed_epoch

    def draw(epoch):
        torch.rand(5)  # whatever was drawn before does not matter
        seed_epoch(3, epoch)
        return torch.rand(3)

    assert torch.equal(draw(2), draw(2))
    assert not torch.equal(draw(2), draw(3))


def test_16_bit_greyscale_keeps_its_contrast(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: a 16-bit PNG (or PGM, mode "I") came out white
    ramp = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)  # 0 .. 61440
    Image.fromarray(ramp).save(tmp_path / "a.png")  # opens as "I;16"
    Image.fromarray(ramp).save(tmp_path / "a.pgm")  # opens as "I"
    for name in ("a.png", "a.pgm"):
        out = np.asarray(load_rgb(tmp_path / name))
        assert out.shape == (4, 4, 3) and (out == (ramp >> 8)[..., None]).all(), name
    # 32-bit integers holding 8-bit values (a TIFF of mode "I") are those values, not 16-bit data
    small = np.arange(0, 256, 16, dtype=np.int32).reshape(4, 4)
    Image.fromarray(small, "I").save(tmp_path / "b.tiff")
    out = np.asarray(load_rgb(tmp_path / "b.tiff"))
    assert (out == small[..., None]).all()


def test_images_in_subfolders_of_a_class_belong_to_it(tmp_path):
    # As torchvision's and timm's ImageFolder find them (Tiny-ImageNet: train/<wnid>/images/*.JPEG);
    # hidden folders and files stay out, and a broken link is a counted skip, not silently dropped.
    root = make_folder(tmp_path, per_class=1, val_per_class=1)
    nested = root / "train" / "red" / "images"
    nested.mkdir()
    Image.new("RGB", (5, 5)).save(nested / "n.JPEG")
    (root / "train" / "red" / "red_boxes.txt").write_text("0 0 4 4\n")
    (root / "train" / "blue" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (5, 5)).save(root / "train" / "blue" / ".ipynb_checkpoints" / "c.png")
    (root / "train" / "blue" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (nested / "loop").symlink_to(root / "train" / "red", target_is_directory=True)  # read once, not forever
    ds = ImageFolder(root, "train", eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    assert ds.classes == ["blue", "red"]
    names = {Path(p).relative_to(root / "train").as_posix(): t for p, t in ds.samples}
    assert names == {"blue/000.png": 0, "blue/gone.jpg": 0, "red/000.png": 1, "red/images/n.JPEG": 1,
                     "red/red_boxes.txt": 1}
    items = {Path(ds.samples[i][0]).name: ds[i] for i in range(len(ds))}
    assert isinstance(items["gone.jpg"], Skipped) and isinstance(items["red_boxes.txt"], Skipped)
    assert items["n.JPEG"][1] == 1 and items["n.JPEG"][0].shape == (3, 8, 8)


def test_truncated_jpeg_is_skipped_and_cmyk_jpeg_keeps_its_colour(tmp_path):
    # The decode must be complete in load(): PIL opens lazily, and a truncated file would otherwise
    # fail inside the transform, outside the skip handling, mid-epoch.
    root = make_folder(tmp_path, per_class=1, val_per_class=1)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    noise.save(root / "train" / "red" / "full.JPEG", quality=90)
    data = (root / "train" / "red" / "full.JPEG").read_bytes()
    (root / "train" / "red" / "cut.JPEG").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 8), (200, 40, 40)).convert("CMYK").save(root / "train" / "blue" / "cmyk.JPEG", quality=95)
    ds = ImageFolder(root, "train", eval_transform(16, (0.0,) * 3, (1 / 255,) * 3))  # pixel values back
    items = {Path(ds.samples[i][0]).name: ds[i] for i in range(len(ds))}
    assert isinstance(items["cut.JPEG"], Skipped) and items["full.JPEG"][1] == 1
    cmyk, target = items["cmyk.JPEG"]
    assert target == 0 and torch.allclose(cmyk.mean((1, 2)), torch.tensor([200.0, 40.0, 40.0]), atol=3)


def test_crop_pct_evaluates_the_centre_of_the_shorter_side(tmp_path):
    # timm's crop_pct: at size S the shorter side goes to S / crop_pct and the centre S x S is kept
    from vitpe.config import ConfigError, from_dict
    from vitpe.data.classification import ClsDataConfig, eval_dataset

    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        img = np.zeros((40, 60, 3), np.uint8)
        img[5:35, 15:45] = 255  # a white centre, 3/4 of the height: the central half lies well inside
        Image.fromarray(img).save(root / split / "a" / "x.png")
    stats = ((0.0,) * 3, (1 / 255,) * 3)  # pixel values back
    whole = eval_dataset(ClsDataConfig(path=str(root), crop_pct=1.0), 8, *stats)[0][0]
    centre = eval_dataset(ClsDataConfig(path=str(root), crop_pct=0.5), 8, *stats)[0][0]
    assert whole.shape == centre.shape == (3, 8, 8)
    assert centre.min() > 250 and whole.min() < 5  # only the white centre, against the whole shorter side
    assert from_dict(ClsDataConfig, {"crop_pct": 0.875}).crop_pct == 0.875
    with pytest.raises(ConfigError, match="data.crop_pct"):
        from_dict(ClsDataConfig, {"crop_pct": 1.5})


@pytest.mark.parametrize("name", ["vitpe_vit_small_patch16_224", "vitpe_vit_tiny_patch4_32", "vit_base_patch16_384",
                                  "deit_small_patch16_224"])
def test_crop_pct_left_unset_is_the_models_as_timms_validate_resolves_it(name):
    import timm
    from timm.data import resolve_data_config

    from vitpe.data.classification import ClsDataConfig, eval_dataset, resolve_crop_pct

    model = timm.create_model(name, pretrained=False, num_classes=2, **({"depth": 1} if "vitpe" in name else {}))
    data = ClsDataConfig(path="unused")
    with pytest.raises(ValueError, match="crop_pct"):
        eval_dataset(data, 32, (0.5,) * 3, (0.5,) * 3)
    resolve_crop_pct(data, name)
    assert data.crop_pct == resolve_data_config({}, model=model)["crop_pct"]
    given = ClsDataConfig(path="unused", crop_pct=0.5)
    resolve_crop_pct(given, name)
    assert given.crop_pct == 0.5


def test_random_erasing_follows_timms_training_script():
    from vitpe.data.classification import AugConfig, train_transform

    erase = train_transform(32, AugConfig(re_prob=1.0), (0.5,) * 3, (0.5,) * 3).transforms[-1]
    assert type(erase).__name__ == "RandomErasing" and (erase.mode, erase.max_count) == ("pixel", 1)
    erase = train_transform(32, AugConfig(re_prob=0.5, re_mode="const", re_count=2), (0.5,) * 3, (0.5,) * 3).transforms[-1]
    assert (erase.mode, erase.max_count, erase.probability) == ("const", 2, 0.5)
