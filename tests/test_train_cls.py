"""End-to-end classification training on a tiny folder dataset made in the test (CPU, seconds)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cls_data import ROOT, make_folder, tiny_argv, train_cls_module
from script_modules import SUBPROCESS_LIMIT_S, torchrun
from vitpe.engine.checkpoint import load_checkpoint
from vitpe.engine.metrics_log import read_metrics

# random crops and flips stay on in the resume test, so that it checks the RNG is restored too
NO_AUG = ["--set", "aug.scale=[1.0, 1.0]", "--set", "aug.ratio=[1.0, 1.0]", "--set", "aug.hflip=0.0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"))


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        train_cls_module().run_cli(train_cls_module().main, argv)
    return exc.value.code


def losses(out: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_two_epoch_run_writes_every_output(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_argv(folder, out)) == 0
    for name in ("config.yaml", "checkpoint.pt", "best.pt", "metrics.jsonl", "results.json", "resolution.png",
                 "resolution.json"):
        assert (out / name).is_file(), name
    from timm.data import ImageDataset
    timm_view = ImageDataset(str(folder / "val"), class_map=str(out / "class_map.txt"))  # validate.py --class-map
    assert sorted(set(timm_view.reader.class_to_idx.items())) == [("blue", 0), ("red", 1)]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["skipped"] == 0 and 0 <= r["val_top1"] <= 100 for r in records)
    results = json.loads((out / "results.json").read_text())
    assert set(results["resolution"]) == {"8", "16", "24"}
    # the training-size column of the resolution evaluation is the final validation itself
    assert results["resolution"]["16"] == pytest.approx(results["top1"])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["classes"] == ["blue", "red"]
    assert state["config"]["model"]["pos"] == "peg" and state["config"]["run"]["epochs"] == 2
    assert state["config"]["data"]["crop_pct"] == 1.0  # the 32-px model's own, resolved and recorded
    printed = capsys.readouterr().out
    assert "| peg |" in printed and "16*" in printed


@pytest.mark.parametrize("extra", [[], ["--set", "ema.enabled=true", "--set", "ema.decay=0.9", "--set", "ema.warmup=true",
                                         "--set", "aug.mixup=0.8", "--set", "aug.cutmix=1.0"]], ids=["plain", "ema_mixup"])
def test_resume_reproduces_the_uninterrupted_losses(folder, tmp_path, monkeypatch, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(tiny_argv(folder, full, *extra, epochs=3)) == 0
    module = train_cls_module()
    original = module.save_epoch

    def stop_after_first(*args, **kwargs):  # a crash right after epoch 1's checkpoint is written
        best = original(*args, **kwargs)
        if args[6] == 0:
            raise KeyboardInterrupt
        return best

    monkeypatch.setattr(module, "save_epoch", stop_after_first)
    assert run(tiny_argv(folder, part, *extra, epochs=3)) == 130
    monkeypatch.setattr(module, "save_epoch", original)
    assert len(losses(part)) == 1
    assert run(["--resume", str(part / "checkpoint.pt")]) == 0  # the checkpoint's own config and output
    assert losses(part) == losses(full)  # exactly: same batches, augmentations and updates
    assert [r["epoch"] for r in read_metrics(part / "metrics.jsonl")] == [0, 1, 2]
    assert [r["val_top1"] for r in read_metrics(part / "metrics.jsonl")] == \
        [r["val_top1"] for r in read_metrics(full / "metrics.jsonl")]
    for key in ("model", "state_dict_ema") if extra else ("model",):  # the averaged weights too, warm-up included
        a, b = load_checkpoint(part / "checkpoint.pt")[key], load_checkpoint(full / "checkpoint.pt")[key]
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_grad_checkpointing_trains_to_the_same_losses(folder, tmp_path):
    assert run(tiny_argv(folder, tmp_path / "plain", "--set", "eval.sizes=[]", epochs=1)) == 0
    assert run(tiny_argv(folder, tmp_path / "ckpt", "--set", "eval.sizes=[]", "--set", "model.grad_checkpointing=true",
                         epochs=1)) == 0
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_warm_up_starts_from_the_trained_weights(warmup):
    from timm.utils import ModelEmaV3

    from vitpe.engine.classification import ClsConfig, train_one_epoch
    from vitpe.engine.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    cfg = ClsConfig()
    cfg.ema.warmup, cfg.optim.warmup_epochs, cfg.optim.clip_grad = warmup, 0.0, None
    initial = [p.detach().clone() for p in model.parameters()]
    ema = ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 2, 1)
    loader = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    train_one_epoch(model, loader, optimizer, scheduler, torch.nn.CrossEntropyLoss(), torch.device("cpu"), 0, cfg,
                    ema=ema)
    trained, averaged = [p.detach() for p in model.parameters()], list(ema.module.parameters())
    if warmup:  # step 1 copies, step 2 averages with decay 1 - 2^(-2/3) = 0.37: close to the weights
        assert all((e - t).abs().max() < (i - t).abs().max() * 0.5 for e, t, i in zip(averaged, trained, initial))
    else:  # decay 0.9 from the first step: still 0.81 of the random start
        assert all(torch.allclose(e, 0.81 * i + 0.19 * t, atol=0.1 * float((i - t).abs().max().detach()))
                   for e, t, i in zip(averaged, trained, initial))


def test_resume_of_a_copied_run_goes_on_in_the_copy_with_the_options_given(folder, tmp_path, caplog):
    """A run copied elsewhere resumes where its checkpoint is (the original stays as it was), and a
    learning rate or weight decay given with --resume is the one the optimizer then uses; the log
    lists what differs from the run's own settings."""
    import logging
    import shutil

    first, copy = tmp_path / "first", tmp_path / "copy"
    assert run(tiny_argv(folder, first, epochs=1)) == 0
    shutil.copytree(first, copy)
    before = (first / "checkpoint.pt").read_bytes()
    with caplog.at_level(logging.INFO, logger="vitpe.cli"):
        assert run(["--resume", str(copy / "checkpoint.pt"), "--epochs", "2", "--lr", "0.1",
                    "--set", "optim.weight_decay=0.3"]) == 0
    line = next(r.getMessage() for r in caplog.records if "resuming with settings" in r.getMessage())
    assert "optim.lr: 0.002 -> 0.1" in line and "optim.weight_decay: 0.05 -> 0.3" in line and "run.epochs: 1 -> 2" in line
    assert "run.output" not in line and "steps per epoch" not in line
    assert (first / "checkpoint.pt").read_bytes() == before and len(losses(first)) == 1
    assert len(losses(copy)) == 2
    state = load_checkpoint(copy / "checkpoint.pt")
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.1] * len(groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.3]
    assert state["scheduler"]["base_lrs"] == [0.1] * len(groups)
    assert state["config"]["optim"]["lr"] == 0.1 and state["config"]["run"]["output"] == str(copy)


def test_two_gloo_processes_match_one_at_the_same_global_batch(folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(tiny_argv(folder, one, *NO_AUG, "--set", "eval.sizes=[]")) == 0
    torchrun("train_cls.py", tiny_argv(folder, two, *NO_AUG, "--set", "eval.sizes=[]"), tmp_path / "logs")
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    v1, v2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["val_top1"] for r in v2] == [r["val_top1"] for r in v1]


def test_corrupt_truncated_and_empty_files_are_skipped_and_counted(tmp_path, caplog):
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "red"
    (bad / "garbage.jpg").write_bytes(b"this is not an image")
    (bad / "empty.png").write_bytes(b"")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "whole.jpg")
    (bad / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:200])
    for i in range(5):  # 24 files: three full batches, so every bad file is met every epoch
        Image.new("RGB", (16, 16), (0, 0, 200)).save(data / "train" / "blue" / f"extra{i}.png")
    caplog.set_level("WARNING")
    assert run(tiny_argv(data, tmp_path / "out", "--set", "eval.sizes=[]")) == 0
    assert [r["skipped"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [3, 3]
    for name in ("garbage.jpg", "empty.png", "truncated.jpg"):
        assert name in caplog.text
    assert "skipped 3 image(s) that could not be read or transformed" in caplog.text
    # decoded up front (data.cache): the same counts, validation's too
    (data / "val" / "red" / "garbage.jpg").write_bytes(b"this is not an image")
    assert run(tiny_argv(data, tmp_path / "cached", "--set", "eval.sizes=[]", "--set", "data.cache=true")) == 0
    records = read_metrics(tmp_path / "cached" / "metrics.jsonl")
    assert [(r["skipped"], r["val_skipped"]) for r in records] == [(3, 1), (3, 1)]
    assert json.loads((tmp_path / "cached" / "results.json").read_text())["skipped"] == 1


def test_a_transform_that_raises_is_drawn_again_and_one_that_always_raises_stops_the_run(folder, tmp_path,
                                                                                         monkeypatch, capsys, caplog):
    resize, calls = Image.Image.resize, [0]

    def flaky_resize(self, *args, **kwargs):  # every third resize raises, as a random augmentation can
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise ValueError("bits must be between or equal to 1 and 8")
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", flaky_resize)
    assert run(tiny_argv(folder, tmp_path / "flaky", "--set", "eval.sizes=[]")) == 0
    assert [r["skipped"] for r in read_metrics(tmp_path / "flaky" / "metrics.jsonl")] == [0, 0]
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: (_ for _ in ()).throw(ValueError("no")))
    assert run(tiny_argv(folder, tmp_path / "broken", "--set", "eval.sizes=[]")) != 0
    err = capsys.readouterr().err
    # a crop that needs no resize can pass now and then: the run stops at the first epoch with none
    assert re.search(r"epoch \d: none of the 16 training images could be read and transformed", err)
    assert "failed 3 times (ValueError: no)" in caplog.text and "Traceback" not in err


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(folder, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "nan"
    module = train_cls_module()
    real = module.build_criterion

    def poisoned(aug, mixup):
        crit, calls = real(aug, mixup), [0]

        def loss(logits, y):
            calls[0] += 1
            value = crit(logits, y)
            return value * float("nan") if calls[0] == 4 else value  # epoch 2, step 2 (2 steps an epoch)

        return loss

    monkeypatch.setattr(module, "build_criterion", poisoned)
    assert run(tiny_argv(folder, out, epochs=3)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epoch 2, step 2" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the last good one, intact


@pytest.mark.parametrize("extra, expected", [
    (["--set", "optim.lrr=0.1"], "optim.lr"),
    (["--set", "optim.lr=fast"], "expected float"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--pos", "pegg"], "peg"),
    (["--eval-sizes", "10,16"], "patch size 4"),
    (["--set", "aug.interpolation=random"], "bilinear"),
])
def test_config_errors_exit_non_zero_with_one_line(folder, tmp_path, capsys, extra, expected):
    assert run(tiny_argv(folder, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_missing_or_empty_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for data, expected in ((tmp_path / "nowhere", "nowhere"), (tmp_path / "empty", "no class folders")):
        assert run(tiny_argv(data, tmp_path / "o")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err


def test_unreadable_config_in_a_real_process_is_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: {path: [unclosed\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train_cls.py"), "--config", str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "bad.yaml" in proc.stderr, proc.stderr


def test_checkpoint_carrying_code_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    assert run(["--resume", str(tmp_path / "evil.pt")]) == 2
    err = capsys.readouterr().err
    assert "evil.pt" in err and "refused" in err and not marker.exists()


def test_resume_given_through_set_is_not_ignored(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert run(["--set", f"run.resume={missing}", "--output", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no fresh run started in its place


def test_mixup_with_an_odd_batch_is_refused_at_start(folder, tmp_path, capsys):
    argv = tiny_argv(folder, tmp_path / "out", "--set", "aug.mixup=0.8", "--batch-size", "3")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "must be even" in err and err.count("\n") == 1


def test_another_model_with_the_default_runs_kwargs_is_warned_about(folder, tmp_path, caplog):
    """The default run's model.kwargs (4 blocks, 64 wide) are kept when only --model changes: they
    would silently shrink a ViT-S to the default's size, so the run says so before it trains."""
    base = ["--data", str(folder), "--epochs", "1", "--batch-size", "8", "--img-size", "16", "--device", "cpu",
            "--workers", "0", "--eval-sizes", "16", "--set", "eval.throughput=false"]
    caplog.set_level("WARNING")
    assert run([*base, "--output", str(tmp_path / "small"), "--model", "vitpe_vit_small_patch16_224"]) == 0
    assert "are the default run's" in caplog.text and "model.kwargs={}" in caplog.text
    caplog.clear()
    assert run([*base, "--output", str(tmp_path / "default")]) == 0  # the default model: its own sizes
    assert run([*base, "--output", str(tmp_path / "sized"), "--model", "vitpe_vit_small_patch16_224", "--set",
                "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]) == 0
    assert "are the default run's" not in caplog.text
