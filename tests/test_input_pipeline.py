"""Decoding and augmenting training batches on the device (data.decode=gpu), run here on CPU, and
the input-pipeline benchmark in a tiny setting so it does not rot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from cls_data import tiny_argv, train_cls_module
from vitpe.data.classification import AugConfig, ClsDataConfig, build_train_val
from vitpe.data.gpu_decode import (DeviceAugment, DeviceDecodeLoader, EncodedFolder, collate_encoded,
                                   device_decodable, resized_crops, sample_boxes)
from vitpe.data.folder import Skipped
from vitpe.engine.metrics_log import read_metrics
from vitpe.errors import UserError
from script_modules import load_script


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: an upscaled random field, so that resizing it is well conditioned."""
    coarse = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """train/a: baseline and progressive RGB JPEGs, grey and CMYK JPEGs, a PNG, a truncated JPEG
    and an empty file; train/b: two RGB JPEGs; val/{a,b}: one JPEG each."""
    root = tmp_path_factory.mktemp("mixed")
    arr = smooth_image(48, 64)
    for split, cls, names in (("train", "a", ["rgb.jpg", "prog.jpg", "grey.jpg", "cmyk.jpg", "x.png"]),
                              ("train", "b", ["1.jpg", "2.jpg"]), ("val", "a", ["v.jpg"]), ("val", "b", ["v.jpg"])):
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            img = Image.fromarray(arr if cls == "a" else 255 - arr)
            img = img.convert({"grey.jpg": "L", "cmyk.jpg": "CMYK"}.get(name, "RGB"))
            img.save(d / name, quality=90, progressive=name == "prog.jpg")
    (root / "train/a/cut.jpg").write_bytes((root / "train/a/rgb.jpg").read_bytes()[:400])
    (root / "train/a/empty.jpg").write_bytes(b"")
    return root


# -- geometry ------------------------------------------------------------------------------------
def test_whole_image_box_without_flip_is_a_plain_resize():
    arr = smooth_image(96, 128)
    out = resized_crops([as_tensor(arr)], torch.tensor([[0, 0, 96, 128]]), torch.tensor([False]), 48)
    pil = np.asarray(Image.fromarray(arr).resize((48, 48), Image.BICUBIC), dtype=np.float32)  # the CPU path's resize
    diff = (out[0].permute(1, 2, 0) - torch.from_numpy(pil)).abs()
    assert diff.mean() < 1.0 and diff.max() < 8


@pytest.mark.parametrize("name, pil", [("bilinear", Image.BILINEAR), ("nearest", Image.NEAREST)])
def test_the_interpolation_asked_for_is_the_one_used(name, pil):
    arr = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)  # detail: modes differ
    out = resized_crops([as_tensor(arr)], torch.tensor([[0, 0, 30, 40]]), torch.tensor([False]), 20, name)
    ref = {m: np.asarray(Image.fromarray(arr).resize((20, 20), m), np.float32) for m in (pil, Image.BICUBIC)}
    diff = {m: (out[0].permute(1, 2, 0) - torch.from_numpy(r)).abs().mean() for m, r in ref.items()}
    assert diff[pil] < 1.0 < diff[Image.BICUBIC]
    with pytest.raises(UserError, match="'lanczos'.*data.decode=cpu"):
        resized_crops([as_tensor(arr)], torch.tensor([[0, 0, 30, 40]]), torch.tensor([False]), 20, "lanczos")


def test_flip_mirrors_and_box_selects_its_region():
    img = as_tensor(smooth_image(40, 64))
    boxes = torch.tensor([[8, 16, 24, 24], [8, 16, 24, 24]])
    out = resized_crops([img, img], boxes, torch.tensor([False, True]), 24)
    # a box as large as the output is an exact crop (no resampling), and the flipped one its mirror
    torch.testing.assert_close(out[0], img[:, 8:32, 16:40].float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], out[0].flip(-1))


def test_sampled_boxes_fit_and_follow_random_resized_crop():
    hw = torch.tensor([[375, 500]] * 4000)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_boxes(hw, scale, ratio, torch.Generator().manual_seed(0)).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (375 * 500)
    assert area.min() > 0.079 and area.max() <= 1.0
    aspect = (w / h).log()
    assert aspect.min() > math.log(ratio[0]) - 0.02 and aspect.max() < math.log(ratio[1]) + 0.02
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 375, 500), list(scale), list(ratio))
                        for _ in range(4000)], dtype=torch.float64)  # (top, left, h, w)
    ref_area = ref[:, 2] * ref[:, 3] / (375 * 500)
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs((left + w / 2).mean() - (ref[:, 1] + ref[:, 3] / 2).mean()) < 5  # centred on average


def test_box_falls_back_to_a_centre_crop_when_no_draw_fits():
    box = sample_boxes(torch.tensor([[10, 1000]]), (0.08, 1.0), (0.75, 4 / 3))[0].tolist()
    assert box == [0, (1000 - 13) // 2, 10, 13]  # the widest allowed aspect, centred


# -- decoding ------------------------------------------------------------------------------------
def test_only_plain_colour_jpegs_go_to_the_device_decoder(mixed):
    a = mixed / "train/a"
    assert [device_decodable((a / n).read_bytes()) for n in ("rgb.jpg", "prog.jpg")] == [True, True]
    assert not any(device_decodable((a / n).read_bytes()) for n in ("grey.jpg", "cmyk.jpg", "x.png", "empty.jpg"))


def test_jpegs_that_do_not_end_as_jpegs_go_to_pil(mixed, tmp_path):
    """A file cut short never reaches the device decoder (nvjpeg can fill the missing part with
    grey instead of failing): PIL refuses it, as on the CPU path; bytes after the end marker are
    PIL's to decode."""
    data = (mixed / "train/a/rgb.jpg").read_bytes()
    assert device_decodable(data) and device_decodable(data + b"\x00" * 7)
    assert not device_decodable((mixed / "train/a/cut.jpg").read_bytes())
    assert not device_decodable(data[:-1]) and not device_decodable(data + b"trailer")
    (tmp_path / "split/c").mkdir(parents=True)
    (tmp_path / "split/c/tail.jpg").write_bytes(data + b"trailer")
    (tmp_path / "split/c/cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    folder = EncodedFolder(tmp_path, "split")
    items = {Path(folder.samples[i][0]).name: folder[i] for i in range(len(folder))}
    assert isinstance(items["cut.jpg"], Skipped) and "truncated" in items["cut.jpg"].reason
    img, target, _ = items["tail.jpg"]
    assert img.shape == (3, 48, 64) and target == 0  # decoded by PIL in the worker


def test_every_readable_file_arrives_and_bad_ones_are_counted(mixed):
    folder = EncodedFolder(mixed, "train")
    batch = collate_encoded([folder[i] for i in range(len(folder))])
    assert len(batch.lengths) == 4 and len(batch.decoded) == 3  # 4 good JPEGs; grey, CMYK, PNG
    aug = DeviceAugment(32, AugConfig(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0), (0.5,) * 3, (0.5,) * 3,
                        torch.device("cpu"))
    out = aug(batch, torch.Generator().manual_seed(0))
    assert sorted(Path(s.path).name for s in out.skipped) == ["cut.jpg", "empty.jpg"]
    assert out.images.shape == (7, 3, 32, 32) and out.images.is_contiguous(memory_format=torch.channels_last)
    assert sorted(out.targets.tolist()) == [0, 0, 0, 0, 0, 1, 1]
    # class a is the image, class b its negative: normalised means of opposite sign, grey aside
    means = out.images.mean(dim=(1, 2, 3))
    a_mean = means[out.targets == 0].median()
    assert torch.allclose(means[out.targets == 1], -a_mean.expand(2), atol=0.05)


def test_loader_is_reproducible_and_reports_worker_errors(mixed):
    folder = EncodedFolder(mixed, "train")
    loader = torch.utils.data.DataLoader(folder, batch_size=4, collate_fn=collate_encoded)
    device_loader = DeviceDecodeLoader(loader, DeviceAugment(16, AugConfig(), (0.5,) * 3, (0.5,) * 3,
                                                             torch.device("cpu")))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(torch.cat([b.images for b in device_loader]))
    assert len(device_loader) == 3 and runs[0].shape == (7, 3, 16, 16)
    torch.testing.assert_close(runs[0], runs[1])

    class Broken(DeviceAugment):
        def __call__(self, batch, generator):
            raise ValueError("bad batch")

    device_loader.augment = Broken(16, AugConfig(), (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="bad batch"):
        list(device_loader)


def test_gpu_decode_refuses_what_it_would_ignore(mixed):
    data = ClsDataConfig(path=str(mixed), decode="gpu")
    with pytest.raises(UserError, match="aug.auto_augment"):
        build_train_val(data, AugConfig(auto_augment="rand-m9"), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UserError, match="aug.interpolation='box'"):
        build_train_val(data, AugConfig(interpolation="box"), (0.5,) * 3, (0.5,) * 3)
    data.cache = True
    with pytest.raises(UserError, match="data.cache=false"):
        build_train_val(data, AugConfig(), (0.5,) * 3, (0.5,) * 3)


def test_train_cls_runs_with_gpu_decode_on_cpu(mixed, tmp_path):
    out = tmp_path / "run"
    argv = tiny_argv(mixed, out, "--set", "data.decode=gpu", "--batch-size", "4", "--eval-sizes", "16", epochs=1)
    with pytest.raises(SystemExit) as exc:
        train_cls_module().run_cli(train_cls_module().main, argv)
    assert exc.value.code == 0
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["skipped"] == 2 and math.isfinite(record["train_loss"])


# -- the benchmark -------------------------------------------------------------------------------
def test_input_pipeline_benchmark_compares_the_three_inputs(tmp_path):
    bench = load_script("benchmarks/input_pipeline.py")  # registered in sys.modules: importable by workers
    bench.main(["--model", "vitpe_vit_tiny_patch4_32", "--model-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
                "--img-size", "32", "--batch-size", "4", "--unique", "3", "--image-size", "64x48", "--warmup", "1",
                "--steps", "2", "--workers", "0", "--gpu-workers", "0", "--device", "cpu", "--no-bf16",
                "--output", str(tmp_path)])
    data = json.loads((tmp_path / "input_pipeline.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["synthetic", "cpu", "gpu"]
    assert data["rows"][0]["ratio"] == 1.0 and all(r["img_s"] > 0 and r["skipped"] == 0 for r in data["rows"])
    assert data["data"]["files"] == 12 and data["data"]["mean_kb"] > 1
    assert (tmp_path / "input_pipeline.md").read_text().count("| JPEG") == 2
