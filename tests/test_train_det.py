"""train_det.py end to end on a tiny COCO-format dataset made here (CPU, seconds)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from det_data import CAT_IDS, make_dataset, truncate
from script_modules import SUBPROCESS_LIMIT_S, load_script, torchrun

from vitpe.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--set", "model.frozen_bn=false", "--set", "model.dim=32",
        "--set", "model.num_heads=4", "--set", "model.enc_layers=1", "--set", "model.dec_layers=2",
        "--set", "model.ffn_dim=64", "--num-queries", "6", "--min-size", "48", "--max-size", "64",
        "--batch-size", "2", "--workers", "0", "--device", "cpu", "--seed", "3", "--set", "eval.batch_size=4"]


def train_det():
    return load_script("train_det.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("coco"))


def test_two_iterations_end_in_coco_metrics(data, tmp_path) -> None:
    out = tmp_path / "run"
    code = train_det().main(["--data", str(data), *TINY, "--epochs", "1", "--pos", "sine",
                             "--eval-sizes", "32,64", "--output", str(out)])
    assert code == 0
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"]) and len(metrics[0]["val_stats"]) == 12
    res = json.loads((out / "results.json").read_text())
    coco = res["coco"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(coco) and len(coco["stats"]) == 12
    assert all(-1 <= v <= 1 for v in coco["stats"])  # COCOeval ran (-1 marks an empty area range)
    assert set(res["eval_sizes"]) == {"32", "64"} and all(len(m["stats"]) == 12 for m in res["eval_sizes"].values())
    assert res["category_ids"] == CAT_IDS and res["dropped"]["train"] == {"zero size": 1}
    assert (out / "detections.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    detections = json.loads((out / "detections_val.json").read_text())
    assert len(detections) == 4 * 6  # every query of every image, as DETR reports them
    assert {d["image_id"] for d in detections} == {100, 101, 102, 103}
    assert {d["category_id"] for d in detections} <= set(CAT_IDS) and all(len(d["bbox"]) == 4 for d in detections)


def pycocotools_stats(ann_file: Path, results_file: Path) -> list[float]:
    """COCOeval run directly on a json and a results file, as COCO's own evaluation does."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(ann_file))
    ev = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return list(ev.stats)


def test_detections_file_with_string_image_ids_gives_the_reported_metrics(tmp_path) -> None:
    """``detections_val.json`` is COCO's results file of the evaluation ``results.json`` reports, in
    the json's own image ids (strings here) and pixels: pycocotools run on it and on the annotation
    file as it is (its zero-size box included) gives the same 12 statistics."""
    data = make_dataset(tmp_path / "data", str_ids=True)
    out = tmp_path / "run"
    assert train_det().main(["--data", str(data), *TINY, "--epochs", "1", "--output", str(out)]) == 0
    detections = json.loads((out / "detections_val.json").read_text())
    assert {d["image_id"] for d in detections} == {"img-100", "img-101", "img-102", "img-103"}
    want = pycocotools_stats(data / "annotations" / "instances_val2017.json", out / "detections_val.json")
    assert json.loads((out / "results.json").read_text())["coco"]["stats"] == pytest.approx(want, abs=1e-12)


def test_unreadable_images_are_skipped_named_and_counted_with_on_error_skip(tmp_path, caplog) -> None:
    """A truncated JPEG in each split: training goes on without it and the evaluation leaves it out
    of the images scored; each is named in the log and counted."""
    data = make_dataset(tmp_path / "data", 5, 4)
    truncate(data / "train2017" / "0001.jpg")
    truncate(data / "val2017" / "0002.jpg")
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        assert train_det().main(["--data", str(data), *TINY, "--epochs", "1", "--output", str(out),
                                 "--on-error", "skip"]) == 0  # data.on_error=skip, as train_seg.py takes it
    for name in ("train2017/0001.jpg", "val2017/0002.jpg"):
        assert f"warning: skipped cannot decode image {data / name}: image file is truncated" in caplog.text
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["skipped"] == 1 and record["val_skipped"] == 1
    coco = json.loads((out / "results.json").read_text())["coco"]
    assert coco["images"] == 3 and coco["skipped"] == 1
    assert {d["image_id"] for d in json.loads((out / "detections_val.json").read_text())} == {100, 101, 103}


def test_unreadable_validation_image_stops_naming_it_and_keeps_the_epoch(tmp_path, capsys) -> None:
    """With ``data.on_error=error`` (the default) a truncated validation image ends the run with one
    line naming it, after the epoch's training is recorded and saved."""
    data = make_dataset(tmp_path / "data", 2, 2)
    truncate(data / "val2017" / "0001.jpg")
    out = tmp_path / "run"
    td = train_det()
    with pytest.raises(SystemExit) as exc:
        td.run_cli(td.main, ["--data", str(data), *TINY, "--epochs", "2", "--output", str(out)])
    assert exc.value.code == 2
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot decode image {data / 'val2017' / '0001.jpg'}") and "on_error=skip" in err


def test_an_evaluation_that_fails_otherwise_keeps_the_epoch_too(tmp_path, monkeypatch) -> None:
    """Whatever stops the validation (here COCOeval on a json it cannot compare), the epoch's
    training is saved before the error reaches the user."""
    data = make_dataset(tmp_path / "data", 2, 2)
    td = train_det()

    def refuses(*args, **kwargs):
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(td, "evaluate", refuses)
    out = tmp_path / "run"
    with pytest.raises(TypeError):
        td.main(["--data", str(data), *TINY, "--epochs", "1", "--output", str(out)])
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_validation_without_images_is_refused_without_boxes_named_and_too_few_queries_warned(tmp_path, caplog,
                                                                                           capsys) -> None:
    data = make_dataset(tmp_path / "data", 2, 2)
    ann = data / "annotations" / "instances_val2017.json"
    original = json.loads(ann.read_text())
    ann.write_text(json.dumps({**original, "images": [], "annotations": []}))
    td = train_det()
    with pytest.raises(SystemExit) as exc:
        td.run_cli(td.main, ["--data", str(data), *TINY, "--epochs", "1", "--output", str(tmp_path / "a")])
    assert exc.value.code == 2 and "instances_val2017.json: no validation images" in capsys.readouterr().err
    ann.write_text(json.dumps({**original, "annotations": []}))
    with caplog.at_level("WARNING"):
        assert td.main(["--data", str(data), *TINY, "--epochs", "1", "--num-queries", "1",
                        "--output", str(tmp_path / "b")]) == 0
    assert "no boxes in the validation images" in caplog.text
    assert "boxes, more than model.num_queries=1" in caplog.text  # the training images have 2 or 3
    assert "final val AP n/a  AP50 n/a" in capsys.readouterr().out  # COCO's -1, not "-100.0"


def test_resume_continues_exactly(data, tmp_path) -> None:
    """Two epochs straight, and one epoch then ``--resume`` for the second: the same losses. (A
    constant rate, so that stopping early does not change the schedule of the first epoch.)"""
    td = train_det()
    args = ["--data", str(data), *TINY, "--epochs", "2", "--pos", "learned", "--set", "optim.schedule=constant"]
    td.main([*args, "--output", str(tmp_path / "straight")])
    td.main([*args, "--output", str(tmp_path / "split"), "--set", "run.epochs=1"])
    # the resumed run keeps its checkpoint's recipe; only the length and output are changed
    td.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), "--epochs", "2",
             "--output", str(tmp_path / "split")])
    read = lambda d: [json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    straight, split = read("straight"), read("split")
    assert [m["epoch"] for m in split] == [0, 1]
    for a, b in zip(straight, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    # resuming a run that has already finished trains nothing and still writes the results
    (tmp_path / "split" / "results.json").unlink()
    td.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), "--output", str(tmp_path / "split")])
    assert len(read("split")) == 2
    assert "AP" in json.loads((tmp_path / "split" / "results.json").read_text())["coco"]


def test_non_finite_loss_stops_at_the_next_read_naming_its_step_and_keeps_the_checkpoint(data, tmp_path, monkeypatch,
                                                                                          capsys) -> None:
    """The loss is read on the host only every ``run.log_interval`` steps and at the end of an
    epoch (no wait for the device per step); a NaN between reads still ends the run before the
    epoch's checkpoint, naming the step it appeared at."""
    td = train_det()
    real = td.build_criterion

    def poisoned(cfg, num_classes):
        crit, calls = real(cfg, num_classes), [0]
        total = crit.total

        def nan_at_fourth(losses):  # 2 steps an epoch: epoch 2, step 2
            calls[0] += 1
            return total(losses) * float("nan") if calls[0] == 4 else total(losses)
        crit.total = nan_at_fourth
        return crit

    monkeypatch.setattr(td, "build_criterion", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        td.run_cli(td.main, ["--data", str(data), *TINY, "--epochs", "3", "--output", str(out),
                             "--set", "run.log_interval=1000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "non-finite loss (nan) at epoch 2, step 2" in err[-1]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the last good one, intact
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_det.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=SUBPROCESS_LIMIT_S, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_json_that_is_not_coco_is_one_line_error(tmp_path) -> None:
    data = make_dataset(tmp_path / "bad", 2, 2)
    ann = data / "annotations" / "instances_train2017.json"
    d = json.loads(ann.read_text())
    del d["images"]
    ann.write_text(json.dumps(d))
    proc = run_cli("--data", str(data), "--device", "cpu", "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "instances_train2017.json" in lines[-1]
    assert "not a COCO file: missing key 'images'" in lines[-1]
    assert not [ln for ln in lines[:-1] if ln.strip() and not ln.startswith("instances_")]  # only info lines before


def test_two_gloo_processes_match_one_at_the_same_global_batch(tmp_path) -> None:
    """Frozen batch norm, no dropout and no random augmentation: the only difference left is the
    split of each global batch over processes, which DETR's loss normalisation makes invisible:
    box losses are divided by the box count, the class loss by the sum of its weights, both
    averaged over processes. One image has no box, so the two processes of a step hold
    different numbers of boxes."""
    data = make_dataset(tmp_path / "data", empty=3)
    fixed = [*TINY, "--set", "model.frozen_bn=true", "--set", "model.dropout=0", "--set", "data.flip=0",
             "--set", "data.multiscale=false", "--set", "data.crop_prob=0", "--epochs", "2"]
    assert train_det().main(["--data", str(data), *fixed, "--output", str(tmp_path / "one")]) == 0
    torchrun("train_det.py", ["--data", str(data), *fixed, "--output", str(tmp_path / "two")], tmp_path / "logs")
    read = lambda d: [json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = read("one"), read("two")
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["val_stats"] == pytest.approx(a["val_stats"], abs=1e-6)


def test_pad_multiple_pads_training_batches_to_coarser_sizes() -> None:
    """``data.pad_multiple`` joins the backbone's stride (0: the stride alone); images stay top-left."""
    import torch

    from vitpe.engine.detection import DetDataConfig, train_collate
    from vitpe.errors import UserError

    class Strided:
        size_divisibility = 32

    items = [(torch.ones(3, 50, 70), {}), (torch.ones(3, 90, 40), {})]
    for multiple, size in [(0, (96, 96)), (64, (128, 128)), (48, (96, 96)), (128, (128, 128))]:
        images, mask, _, _ = train_collate(Strided(), DetDataConfig(pad_multiple=multiple))(items)
        assert images.shape[-2:] == size and mask.shape[-2:] == size, multiple
        assert not mask[0, :50, :70].any() and mask[0, 50:].all() and mask[0, :, 70:].all()
    with pytest.raises(UserError, match="data.pad_multiple"):
        train_collate(Strided(), DetDataConfig(pad_multiple=-32))
