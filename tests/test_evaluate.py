"""The resolution evaluation: `python -m vitpe.evaluate` over several checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cls_data import make_folder, tiny_argv, train_cls_module
from vitpe import evaluate as ev


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Two one-epoch runs (peg, learned) on a tiny folder."""
    root = tmp_path_factory.mktemp("eval")
    data = make_folder(root / "data")
    module = train_cls_module()
    out = {}
    for pos in ("peg", "learned"):
        out[pos] = root / pos
        with pytest.raises(SystemExit) as e:
            module.run_cli(module.main, tiny_argv(data, out[pos], "--pos", pos, "--set", "eval.sizes=[]", epochs=1))
        assert e.value.code == 0
    return data, out


def run_eval(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        ev.run_cli(ev.main, argv)
    return e.value.code


def test_table_json_plot_and_throughput(runs, tmp_path, capsys):
    data, out = runs
    ckpts = [str(out["peg"] / "checkpoint.pt"), str(out["learned"] / "checkpoint.pt")]
    assert run_eval(["--checkpoint", *ckpts, "--data", str(data), "--sizes", "8,16,32", "--output", str(tmp_path),
                     "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| strategy | 8 | 16* | 32 |" in printed and "| peg |" in printed and "| learned |" in printed
    assert "images/s" in printed
    res = json.loads((tmp_path / "resolution.json").read_text())
    assert list(res) == ["peg", "learned"]
    for label, pos in (("peg", "peg"), ("learned", "learned")):
        sizes = res[label]["sizes"]
        assert set(sizes) == {"8", "16", "32"} and res[label]["train_size"] == 16
        assert all(0 <= v["top1"] <= v["top5"] <= 100 and v["img_per_s"] > 0 for v in sizes.values())
        # at the training size the evaluation is exactly the training run's own validation
        last = json.loads((out[pos] / "results.json").read_text())
        assert sizes["16"]["top1"] == pytest.approx(last["top1"])
    assert (tmp_path / "resolution.png").stat().st_size > 1000


def test_same_strategy_twice_is_labelled_by_run_folder(runs, tmp_path):
    _, out = runs
    ck = str(out["peg"] / "checkpoint.pt")
    assert run_eval(["--checkpoint", ck, str(out["peg"] / "best.pt"), "--sizes", "16", "--output", str(tmp_path),
                     "--device", "cpu", "--workers", "0", "--no-throughput"]) == 0
    assert list(json.loads((tmp_path / "resolution.json").read_text())) == ["peg (peg)", "peg (peg) #2"]


def test_size_not_a_multiple_of_the_patch_is_one_line(runs, tmp_path, capsys):
    _, out = runs
    assert run_eval(["--checkpoint", str(out["peg"] / "checkpoint.pt"), "--sizes", "18", "--output", str(tmp_path),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "18" in err and "patch size 4" in err


def test_data_with_other_classes_and_bad_flags_are_one_line(runs, tmp_path, capsys):
    """A folder model scored on the synthetic set (other classes, more of them) would index
    outputs it does not have; a batch size below 1 or negative workers are refused up front."""
    _, out = runs
    argv = ["--checkpoint", str(out["peg"] / "checkpoint.pt"), "--sizes", "16", "--output", str(tmp_path),
            "--device", "cpu", "--workers", "0", "--no-throughput"]
    assert run_eval([*argv, "--data", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "synthetic" in err and "['blue', 'red']" in err
    for flag, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--workers", "-2")):
        assert run_eval([*argv, flag, value]) == 2
        assert f"{flag} {value}: must be at least" in capsys.readouterr().err
    assert not (tmp_path / "resolution.json").exists()
    import torch

    state = torch.load(out["peg"] / "checkpoint.pt", weights_only=True)
    del state["classes"]  # not one a training run writes
    torch.save(state, tmp_path / "no_classes.pt")
    argv[1] = str(tmp_path / "no_classes.pt")
    assert run_eval(argv) == 2
    assert "not a vitpe training checkpoint (no 'classes' entry)" in capsys.readouterr().err


def test_a_model_that_pads_its_input_takes_any_size():
    import timm

    kw = dict(pos="learned", depth=1, num_classes=3)
    ev.check_sizes([18, 32], timm.create_model("vitpe_vit_tiny_patch4_32", dynamic_img_pad=True, **kw))
    with pytest.raises(ev.UserError, match=r"test sizes \[18\] are not multiples of the patch size 4"):
        ev.check_sizes([18, 32], timm.create_model("vitpe_vit_tiny_patch4_32", **kw))


def test_set_overrides_the_checkpoints_data_config_and_unreadable_images_are_counted(runs, tmp_path, capsys):
    import shutil

    data, out = runs
    other = tmp_path / "data"
    shutil.copytree(data, other)
    (other / "val" / "red" / "zz_bad.png").write_bytes(b"")
    argv = ["--checkpoint", str(out["peg"] / "checkpoint.pt"), "--data", str(other), "--sizes", "16",
            "--output", str(tmp_path / "r"), "--device", "cpu", "--workers", "0", "--no-throughput"]
    for cache in ("true", "false"):
        assert run_eval([*argv, "--set", f"data.cache={cache}"]) == 0
        sizes = json.loads((tmp_path / "r" / "resolution.json").read_text())["peg"]["sizes"]
        assert sizes["16"]["skipped"] == 1 and sizes["16"]["n"] == 8
        assert "1 unreadable validation image(s) skipped" in capsys.readouterr().out
    mixed = tmp_path / "mixed"  # another folder: a process keeps the cache of the first
    shutil.copytree(other, mixed)
    Image.new("RGB", (20, 20)).save(mixed / "val" / "red" / "big.png")
    argv[argv.index(str(other))] = str(mixed)
    assert run_eval([*argv, "--set", "data.cache=true"]) == 2  # a cache needs one image size
    assert "data.cache=false" in capsys.readouterr().err
    assert run_eval([*argv, "--set", "data.cache=false"]) == 0
    assert run_eval([*argv, "--set", "data.nope=1"]) == 2
    assert run_eval([*argv, "--set", "model.pos=none"]) == 2  # the model comes from the checkpoint
    assert run_eval([*argv, "--set", "run.amp=false"]) == 0  # float32 on a GPU, as timm's validate.py


class _RunsOutAbove(torch.nn.Module):
    """The trained model, with an allocator that fails on inputs larger than ``limit`` pixels."""

    def __init__(self, model, limit: int, error: BaseException):
        super().__init__()
        self.model, self.limit, self.error = model, limit, error

    def forward(self, x):
        if x.shape[-1] > self.limit:
            raise self.error
        return self.model(x)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 99999999999 bytes.")])
def test_a_size_that_runs_out_of_memory_is_reported_and_the_others_still_run(runs, tmp_path, error, caplog):
    data, out = runs
    model, cfg, state = ev.load_model(str(out["peg"] / "checkpoint.pt"), torch.device("cpu"))
    cfg.data.path, cfg.data.workers, cfg.eval.throughput = str(data), 0, False
    big = _RunsOutAbove(model, 16, error)
    sizes = ev.evaluate_sizes(big, cfg, [32, 8, 16], torch.device("cpu"), tuple(state["mean"]),
                              tuple(state["std"]), state["classes"])
    assert list(sizes) == [32, 8, 16]
    assert "top1" not in sizes[32] and "out of memory (accuracy, batch size" in sizes[32]["error"]
    assert all(sizes[s]["n"] == 8 and "error" not in sizes[s] for s in (8, 16))  # the sizes after it still ran
    assert sizes[16]["top1"] == ev.evaluate_sizes(model, cfg, [16], torch.device("cpu"), tuple(state["mean"]),
                                                  tuple(state["std"]), state["classes"])[16]["top1"]
    assert "test size 32px: out of memory" in caplog.text
    report = {"peg": {"checkpoint": "x", "train_size": 16, "sizes": sizes}}
    text = ev.write_report(report, tmp_path)
    row = [line for line in text.splitlines() if line.startswith("| peg |")][0]
    assert row == f"| peg | {sizes[8]['top1']:.1f} | {sizes[16]['top1']:.1f} | OOM |"  # columns 8, 16*, 32
    assert "peg, 32px: out of memory" in text
    assert (tmp_path / "resolution.png").exists()  # the plot leaves the failed size out


def test_an_error_other_than_memory_is_not_swallowed(runs):
    data, out = runs
    model, cfg, state = ev.load_model(str(out["peg"] / "checkpoint.pt"), torch.device("cpu"))
    cfg.data.path, cfg.data.workers, cfg.eval.throughput = str(data), 0, False
    broken = _RunsOutAbove(model, 8, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        ev.evaluate_sizes(broken, cfg, [16], torch.device("cpu"), tuple(state["mean"]), tuple(state["std"]),
                          state["classes"])


def test_markdown_table_marks_the_training_size():
    results = {"a": {"train_size": 32, "sizes": {16: {"top1": 50.0}, 32: {"top1": 90.25}}},
               "b": {"train_size": 32, "sizes": {32: {"top1": 80.0}}}}
    table = ev.markdown_table(results).splitlines()
    assert table[0] == "| strategy | 16 | 32* |"
    assert table[2] == "| a | 50.0 | 90.2 |" and table[3] == "| b | - | 80.0 |"


def test_sweep_trains_every_strategy_at_once_and_merges_the_reports(tmp_path):
    from script_modules import ROOT, load_script

    sweep = load_script("scripts/resolution_sweep.py")
    out = tmp_path / "sweep"
    sweep.main(["--config", str(ROOT / "configs/cls/synthetic.yaml"), "--strategies", "none,rope_axial",
                "--epochs", "1", "--sizes", "16,32", "--output", str(out), "--set", "run.device=cpu",
                "--set", "data.synthetic_train=64", "--set", "data.synthetic_val=16", "--set", "eval.batch_size=16",
                "--set", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"])
    res = json.loads((out / "resolution.json").read_text())
    assert list(res) == ["none", "rope_axial"]
    for r in res.values():
        assert set(r["sizes"]) == {"16", "32"} and all(v["img_per_s"] > 0 for v in r["sizes"].values())
        assert len(r["metrics"]) == 1  # one epoch, read back from the run's metrics.jsonl
    assert json.loads((out / "sweep.json").read_text())["epochs"] == 1


def test_segmentation_checkpoints_are_scored_at_each_scale_as_their_runs_score_them(runs, tmp_path, capsys):
    """Two MiT runs (two strategies) evaluated at test scales: the same mIoU as each run's own final
    evaluation at those scales, one table across strategies with scale 1.0 marked; --sizes is
    refused for them, and checkpoints of two tasks in one call are named."""
    from script_modules import load_script
    from test_seg import TINY, make_dataset

    train_seg = load_script("train_seg.py")
    data = make_dataset(tmp_path / "data", n_train=4, n_val=2)
    ckpts = []
    for pos in ("mixffn", "none"):
        out = tmp_path / pos
        assert train_seg.main(["--data", str(data), "--epochs", "1", "--pos", pos, "--eval-scales", "0.5,1.0",
                               "--output", str(out), *TINY]) == 0
        ckpts.append(str(out / "checkpoint.pt"))
    capsys.readouterr()
    argv = ["--checkpoint", *ckpts, "--output", str(tmp_path / "res"), "--device", "cpu", "--workers", "0"]
    assert run_eval([*argv, "--scales", "0.5,1.0"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU (%) by test scale" in printed and "| strategy | 0.5 | 1.0* |" in printed
    res = json.loads((tmp_path / "res" / "resolution.json").read_text())
    assert list(res) == ["mixffn", "none"]
    for label in res:
        own = json.loads((tmp_path / label / "results.json").read_text())["scales"]["whole"]
        assert res[label]["task"] == "segmentation" and set(res[label]["sizes"]) == {"0.5", "1.0"}
        for scale in ("0.5", "1.0"):
            assert res[label]["sizes"][scale]["mIoU"] == pytest.approx(own[scale]["mIoU"], abs=1e-9)
    assert run_eval([*argv, "--sizes", "32"]) == 2
    assert "--sizes: segmentation checkpoints are evaluated at --scales" in capsys.readouterr().err
    # a scale that runs out of memory: the scales are then taken one at a time, that one marked
    from vitpe.engine import segmentation

    real = segmentation.evaluate

    def runs_out_at_2(model, dataset, device, amp, modes, scales, *a, **k):
        if 2.0 in scales:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")
        return real(model, dataset, device, amp, modes, scales, *a, **k)

    segmentation.evaluate = runs_out_at_2
    try:
        assert run_eval([*argv[:2], *argv[3:], "--scales", "1.0,2.0"]) == 0
    finally:
        segmentation.evaluate = real
    printed = capsys.readouterr().out
    assert "| mixffn |" in printed and "| OOM |" in printed and "mixffn, scale 2.0: out of memory" in printed
    res = json.loads((tmp_path / "res" / "resolution.json").read_text())["mixffn"]["sizes"]
    assert res["2.0"] == {"error": "out of memory"}
    own = json.loads((tmp_path / "mixffn" / "results.json").read_text())["scales"]["whole"]
    assert res["1.0"]["mIoU"] == pytest.approx(own["1.0"]["mIoU"], abs=1e-9)
    _, cls_runs = runs
    assert run_eval(["--checkpoint", str(cls_runs["peg"] / "checkpoint.pt"), ckpts[0], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpts[0]}: a segmentation run's checkpoint among classification ones" in err


def test_detection_checkpoints_are_scored_at_each_shorter_side_as_their_run_scores_them(tmp_path, capsys):
    """A DETR run evaluated at shorter sides: at its training size the AP of its last validation,
    at another the AP of its own --eval-sizes evaluation; the table is in percent, the training
    size marked, and AP50 is given too."""
    from det_data import make_dataset
    from script_modules import load_script
    from test_train_det import TINY

    train_det = load_script("train_det.py")
    data, out = make_dataset(tmp_path / "coco"), tmp_path / "sine"
    assert train_det.main(["--data", str(data), *TINY, "--epochs", "1", "--pos", "sine", "--eval-sizes", "32",
                           "--output", str(out)]) == 0
    capsys.readouterr()
    assert run_eval(["--checkpoint", str(out / "checkpoint.pt"), "--sizes", "32,48", "--output",
                     str(tmp_path / "res"), "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "COCO AP (%) by shorter side" in printed and "| strategy | 32 | 48* |" in printed and "AP50" in printed
    res = json.loads((tmp_path / "res" / "resolution.json").read_text())["sine"]
    own = json.loads((out / "results.json").read_text())
    assert res["task"] == "detection" and res["train_size"] == 48
    assert res["sizes"]["48"]["AP"] == pytest.approx(own["coco"]["AP"], abs=1e-9)
    assert res["sizes"]["32"]["AP"] == pytest.approx(own["eval_sizes"]["32"]["AP"], abs=1e-9)
    # a validation json with some of the training categories: read in the training labels
    from det_data import CAT_IDS

    path = data / "annotations" / "instances_val2017.json"
    d = json.loads(path.read_text())
    d["categories"] = [c for c in d["categories"] if c["id"] != CAT_IDS[0]]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] != CAT_IDS[0]]
    path.write_text(json.dumps(d))
    assert run_eval(["--checkpoint", str(out / "checkpoint.pt"), "--sizes", "48", "--output", str(tmp_path / "sub"),
                     "--device", "cpu", "--workers", "0"]) == 0
    sub = json.loads((tmp_path / "sub" / "resolution.json").read_text())["sine"]["sizes"]["48"]
    assert -1 <= sub["AP"] <= 1 and sub["n"] == res["sizes"]["48"]["n"]


def test_a_checkpoint_of_no_training_run_is_named(tmp_path, capsys):
    from vitpe.engine.checkpoint import save_checkpoint

    save_checkpoint({"config": {"nonsense": 1}, "model": {}, "classes": ["a"]}, tmp_path / "odd.pt")
    assert run_eval(["--checkpoint", str(tmp_path / "odd.pt"), "--data", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "odd.pt: its config is not a vitpe training run's (unknown key 'nonsense'" in err and "Traceback" not in err


def test_ema_weights_are_where_timms_tools_look_and_old_checkpoints_still_load(tmp_path):
    import timm
    import torch

    from vitpe.engine.checkpoint import load_checkpoint, save_checkpoint

    data = make_folder(tmp_path / "data", per_class=4, val_per_class=2)
    module = train_cls_module()
    with pytest.raises(SystemExit) as e:
        module.run_cli(module.main, tiny_argv(data, tmp_path / "run", "--set", "ema.enabled=true", "--set",
                                              "ema.decay=0.5", "--set", "eval.sizes=[]", epochs=1))
    assert e.value.code == 0
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    ema, raw = state["state_dict_ema"], state["model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    model, _, _ = ev.load_model(str(path), torch.device("cpu"))  # auto: the EMA
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    cfg = state["config"]["model"]
    other = timm.create_model(cfg["name"], pos=cfg["pos"], num_classes=2, img_size=16, **cfg["kwargs"])
    timm.models.load_checkpoint(other, str(path), use_ema=True)  # validate.py --use-ema
    assert all(torch.equal(v, ema[k]) for k, v in other.state_dict().items())
    state["ema"] = state.pop("state_dict_ema")  # a checkpoint written before the rename
    save_checkpoint(state, tmp_path / "old.pt")
    model, _, _ = ev.load_model(str(tmp_path / "old.pt"), torch.device("cpu"), "ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_timms_own_models_are_built_at_the_training_size_and_take_any_size():
    import timm
    import torch

    from vitpe.config import ModelConfig
    from vitpe.engine.classification import build_model
    from vitpe.errors import UserError

    vit = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs={"depth": 1}), 3, 64)
    ev.check_sizes([32, 64, 96], vit)
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 96, 48)).shape == (1, 3)
    resnet = build_model(ModelConfig(name="resnet18"), 3, 64)  # takes neither option: built without them
    assert resnet.fc.out_features == 3
    fixed = build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs={"depth": 1, "dynamic_img_size": False}),
                        3, 64)
    with pytest.raises(UserError, match=r"test sizes \[32\]: the model takes 64x64 inputs only"):
        ev.check_sizes([32, 64], fixed)
    assert timm.create_model("vit_tiny_patch16_224", depth=1).patch_embed.strict_img_size  # timm's default


def test_every_checkpoint_is_checked_before_any_is_evaluated(runs, tmp_path, capsys):
    """A checkpoint whose data has other classes stops the run before the first checkpoint is
    evaluated, and the error names it."""
    _, out = runs
    state = torch.load(out["peg"] / "checkpoint.pt", weights_only=True)
    state["classes"] = ["cat", "dog"]  # its config's folder has blue and red
    other = tmp_path / "other.pt"
    torch.save(state, other)
    calls = []
    argv = ["--checkpoint", str(out["learned"] / "checkpoint.pt"), str(other), "--sizes", "16", "--device", "cpu",
            "--workers", "0", "--no-throughput", "--output", str(tmp_path / "res")]
    original = ev.evaluate_sizes
    ev.evaluate_sizes = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        assert run_eval(argv) == 2
    finally:
        ev.evaluate_sizes = original
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "trained on the classes ['cat', 'dog']" in err
    assert "'blue'" in err and "'red'" in err  # the folder's
    assert calls == [] and not (tmp_path / "res").exists()
    # a size that the second checkpoint's patch does not divide is named with that checkpoint too
    assert run_eval([*argv[:2], str(out["peg"] / "checkpoint.pt"), *argv[3:4], "18", *argv[5:]]) == 2
    assert str(out["learned"] / "checkpoint.pt") in capsys.readouterr().err


def test_results_are_written_after_each_checkpoint(runs, tmp_path, monkeypatch):
    """A failure while evaluating the second checkpoint keeps the first one's results on disk."""
    _, out = runs
    original, calls = ev.evaluate_sizes, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a fault of the second checkpoint's evaluation")
        return original(*a, **k)

    monkeypatch.setattr(ev, "evaluate_sizes", second_fails)
    with pytest.raises(RuntimeError, match="second checkpoint"):
        ev.main(["--checkpoint", str(out["peg"] / "checkpoint.pt"), str(out["learned"] / "checkpoint.pt"),
                 "--sizes", "16", "--device", "cpu", "--workers", "0", "--no-throughput", "--output", str(tmp_path)])
    assert list(json.loads((tmp_path / "resolution.json").read_text())) == ["peg"]


def test_timms_own_model_is_labelled_by_its_name_not_by_a_strategy_it_does_not_use(tmp_path, capsys):
    """A timm ViT takes no ``pos`` (its learned table is its own): the run's table, results.json and
    the evaluation name it by model, not by the ``model.pos`` of the config, which it ignores."""
    data = make_folder(tmp_path / "data")
    module = train_cls_module()
    with pytest.raises(SystemExit) as e:
        module.run_cli(module.main, tiny_argv(data, tmp_path / "run", "--model", "vit_tiny_patch16_224", "--pos",
                                              "rope_mixed", "--eval-sizes", "16,32", epochs=1))
    assert e.value.code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["pos"] is None and results["model"] == "vit_tiny_patch16_224"
    assert list(json.loads((tmp_path / "run" / "resolution.json").read_text())) == ["vit_tiny_patch16_224"]
    assert run_eval(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--sizes", "16,32", "--output",
                     str(tmp_path / "res"), "--device", "cpu", "--workers", "0", "--no-throughput"]) == 0
    assert "| vit_tiny_patch16_224 |" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "res" / "resolution.json").read_text())) == ["vit_tiny_patch16_224"]


def test_each_task_has_its_default_test_sizes_and_refuses_the_other_option():
    import argparse

    from vitpe.engine.detection import DetConfig
    from vitpe.engine.segmentation import SegConfig

    def sizes(task, cfg, **kw):
        return ev._test_sizes(task, cfg, argparse.Namespace(**{"sizes": None, "scales": None, **kw}))

    det = DetConfig()
    det.data.min_size = 48
    assert sizes("detection", det) == [24, 36, 48, 60, 72]  # 0.5-1.5x the training size
    det.eval.sizes = [32]
    assert sizes("detection", det) == [32, 48] and sizes("detection", det, sizes=[40]) == [40]
    assert sizes("segmentation", SegConfig()) == ev.SEG_SCALES
    assert sizes("segmentation", SegConfig(), scales=[0.5, 2.0]) == [0.5, 2.0]
    assert sizes("classification", ev.ClsConfig()) == ev.CLS_SIZES
    with pytest.raises(ev.UserError, match="--scales: classification checkpoints are evaluated at --sizes"):
        sizes("classification", ev.ClsConfig(), scales=[1.0])
