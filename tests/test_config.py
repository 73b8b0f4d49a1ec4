"""The shared training pieces: typed configs and overrides, CLI resolution, checkpoints, RNG state,
optimizer groups and schedules, metrics log."""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from vitpe.cli import common_parser, parse_sizes, resolve_config
from vitpe.config import (ConfigError, DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, apply_overrides,
                          from_dict, load_config, save_config, to_dict)
from vitpe.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vitpe.engine.metrics_log import MetricsLog, summary_line
from vitpe.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from vitpe.errors import CheckpointError, UserError


@dataclass
class Cfg:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- config ------------------------------------------------------------------------------------
def test_overrides_parse_yaml_and_check_types():
    cfg = apply_overrides(Cfg(), ["optim.lr=1e-3", "model.kwargs.depth=2", "eval.sizes=[16, 32]",
                                  "optim.clip_grad=null", "data.path=2024", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.model.kwargs == {"depth": 2} and cfg.eval.sizes == [16, 32]
    assert cfg.optim.clip_grad is None and cfg.data.path == "2024" and cfg.optim.betas == (0.9, 0.95)
    assert Cfg().optim.lr == OptimConfig().lr  # the original is not modified


@pytest.mark.parametrize("item, message", [
    ("optim.lrr=1", "optim.lr"),
    ("optim.lr=abc", "expected float"),
    ("data.img_size=1.5", "expected int"),
    ("run.amp=3", "expected bool"),
    ("optim.schedule=linear", "cosine"),
    ("optim.betas=[0.9]", "expected 2 values"),
    ("model.name.x=1", "no sub-keys"),
    ("no_equals_sign", "key=value"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Cfg(), [item])


def test_unknown_key_in_a_file_names_the_file_and_the_closest_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, Cfg)
    assert str(path) in str(e.value) and "optim.weight_decay" in str(e.value)
    assert issubclass(ConfigError, UserError)


def test_yaml_round_trip_and_dict_round_trip(tmp_path):
    cfg = apply_overrides(Cfg(), ["model.pos_kwargs={peg: {after: [0, 1]}}", "run.resume=x.pt"])
    save_config(cfg, tmp_path / "c.yaml")
    # the saved recipe starts a new run: everything round-trips but run.resume, which is an action
    assert load_config(tmp_path / "c.yaml", Cfg) == apply_overrides(cfg, ["run.resume=null"])
    assert load_config(tmp_path / "c.yaml", Cfg).run.resume is None
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert isinstance(to_dict(cfg)["optim"]["betas"], list)  # plain data for YAML and checkpoints


def test_cli_resolution_order(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {lr: 0.5, weight_decay: 0.2}\nrun: {epochs: 7}\n")
    args = common_parser("t").parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.1", "--epochs", "3",
                                          "--set", "run.epochs=4", "--eval-sizes", "16,32"])
    cfg = resolve_config(Cfg, args)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.run.epochs, cfg.eval.sizes) == (0.1, 0.2, 4, [16, 32])
    assert resolve_config(Cfg, common_parser("t").parse_args([])) == Cfg()  # unset options change nothing
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sizes("16,x")


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_is_atomic_and_plain(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint({"w": torch.arange(3), "cfg": {"a": [1, "b"]}}, path)
    save_checkpoint({"w": torch.arange(4)}, path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temp files left
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4))  # a failed save leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]


def test_corrupt_and_code_carrying_checkpoints_are_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"f": random.Random}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    first = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(2).tolist()) == first
    assert all(isinstance(v, torch.Tensor) for v in rng_state().values())


# -- optimizer and schedule ----------------------------------------------------------------------
def test_weight_decay_skips_norms_biases_and_position_tables():
    import timm

    import vitpe  # noqa: F401

    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned", depth=1, num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos.pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" not in skipped
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_weight_decay_reads_wildcards_in_no_weight_decay_as_timm_does():
    """timm's models may name patterns (XCiT: ``pos_embed.*``, its convolutional position
    encoding); the groups are timm's own ``param_groups_weight_decay``'s."""
    import timm
    from timm.optim import param_groups_weight_decay

    model = timm.create_model("xcit_nano_12_p16_224", depth=1, num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)] for p in param_groups(model, 0.05)[1]["params"]}
    timms = {names[id(p)] for g in param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
             if g["weight_decay"] == 0 for p in g["params"]}
    assert "pos_embed.token_projection.weight" in timms and ours == timms


def test_layer_decay_gives_each_layer_timms_rate_and_keeps_the_decay_groups():
    """``optim.layer_decay``: every parameter at the rate timm's ``param_groups_layer_decay`` gives
    it (the stem slowest, the head at the peak), the weight-decay membership unchanged, the ratios
    kept by the schedule; a model that does not number its layers is named."""
    import timm
    from timm.optim import param_groups_layer_decay

    import vitpe  # noqa: F401
    from vitpe.engine.classification import ClsOptimConfig

    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned+rpb", depth=3, num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = ClsOptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.5, warmup_epochs=0, schedule="cosine")
    opt = build_optimizer(model, cfg)
    rate = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    ref = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.5) for p in g["params"]}
    assert rate.keys() == ref.keys()
    for name, scale in ref.items():
        assert rate[name] == pytest.approx(1e-3 * scale), name
    assert rate["head.weight"] == pytest.approx(1e-3) and rate["patch_embed.proj.weight"] == pytest.approx(1e-3 / 16)
    plain_decayed = {names[id(p)] for p in param_groups(model, 0.05)[0]["params"]}
    assert decayed == plain_decayed
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=2)
    for _ in range(3):
        opt.step()
        sched.step()
    after = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert after["blocks.0.attn.qkv.weight"] / after["head.weight"] == pytest.approx(0.125)
    with pytest.raises(ConfigError, match="optim.layer_decay: Linear does not number its layers"):
        build_optimizer(torch.nn.Linear(2, 2), cfg)


def test_schedules_warm_up_then_decay_to_the_floor():
    f = [lr_factor(s, 100, 10, "cosine", 0.01, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(f[:10], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(55, 100, 10, "poly", min_ratio=0.0, power=1.0) == pytest.approx(0.5)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(lr=1.0, warmup_epochs=1))
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_epochs=1, warmup_lr_ratio=0.0), 4, 3)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]) and lrs[-1] < 0.1


def test_lr_base_batch_scales_every_groups_rate_to_the_global_batch():
    from vitpe.engine import detection, segmentation

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert [g["lr"] for g in build_optimizer(model, OptimConfig(lr=5e-4), 256).param_groups] == [5e-4, 5e-4]
    opt = build_optimizer(model, OptimConfig(lr=5e-4, lr_base_batch=512), 256)  # DeiT's rule
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="lr_base_batch"):
        build_optimizer(model, OptimConfig(lr_base_batch=512))
    seg = segmentation.build_model(segmentation.SegModelConfig(name="vitpe_mit_b0", head_dim=16), 3, 64)
    cfg = segmentation.SegOptimConfig(lr=6e-5, head_lr_mult=10.0, lr_base_batch=16)
    lrs = {g["lr"] for g in segmentation.build_optimizer(seg, cfg, 8).param_groups}
    assert sorted(lrs) == pytest.approx([3e-5, 3e-4])  # the head keeps its ten times the backbone's
    det = detection.build_model(detection.DetModelConfig(backbone="resnet18", dim=16, num_heads=2, enc_layers=1,
                                                          dec_layers=1, ffn_dim=16, num_queries=4), 2)
    cfg = detection.DetOptimConfig(lr=1e-4, backbone_lr=1e-5, lr_base_batch=64)
    lrs = {g["lr"] for g in detection.build_optimizer(det, cfg, 32).param_groups}
    assert sorted(lrs) == pytest.approx([5e-6, 5e-5])
    with pytest.raises(ConfigError, match="lr_base_batch"):
        from_dict(OptimConfig, {"lr_base_batch": 0})



def _train_steps(model, optimizer, scheduler, steps: int) -> list[float]:
    """The rate each of ``steps`` optimizer steps used."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(3, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return lrs


def test_a_run_resumed_with_more_epochs_takes_its_first_step_on_the_new_schedule():
    """Extending a run (``--resume ... --epochs 4``) changes only the schedule's length: the first
    step after the resume is at the new schedule's rate, not where the old one ended."""
    from vitpe.engine.loop import restore_training_state, training_state

    cfg = OptimConfig(lr=1.0, warmup_epochs=1, warmup_lr_ratio=0.01, min_lr_ratio=0.01, clip_grad=None)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10, 2)
    _train_steps(model, optimizer, scheduler, 20)  # the whole 2-epoch run: its rate ends at the floor
    state = training_state(model, optimizer, scheduler, 2, {})
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10, 4)
    assert restore_training_state(state, model, optimizer, scheduler) == 2
    expected = [lr_factor(step, 40, 10, "cosine", 0.01, 0.01) for step in (20, 21, 22)]
    assert _train_steps(model, optimizer, scheduler, 3) == pytest.approx(expected)



@pytest.mark.parametrize("steps_per_epoch", [5, 20])
def test_a_run_resumed_with_another_batch_size_keeps_its_place_in_the_schedule(steps_per_epoch):
    """The schedule counts optimizer steps; another batch size on ``--resume`` changes the steps
    per epoch, and the epochs done keep their share of the schedule: the resumed run ends at the
    end of its schedule, neither cut short nor stopped before the floor."""
    from vitpe.engine.loop import restore_training_state, training_state

    cfg = OptimConfig(lr=1.0, warmup_epochs=1, warmup_lr_ratio=0.01, min_lr_ratio=0.01, clip_grad=None)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10, 4)
    _train_steps(model, optimizer, scheduler, 10)  # epoch 1 of 4 at 10 steps an epoch
    state = training_state(model, optimizer, scheduler, 1, {})
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, 4)
    restore_training_state(state, model, optimizer, scheduler)
    total, warmup = 4 * steps_per_epoch, steps_per_epoch
    lrs = _train_steps(model, optimizer, scheduler, 3 * steps_per_epoch)  # epochs 2 to 4
    assert lrs == pytest.approx([lr_factor(k, total, warmup, "cosine", 0.01, 0.01)
                                 for k in range(steps_per_epoch, total)])
    assert scheduler.last_epoch == total
    assert training_state(model, optimizer, scheduler, 4, {})["scheduler"]["steps_per_epoch"] == steps_per_epoch


# -- metrics log ---------------------------------------------------------------------------------
def test_metrics_log_drops_epochs_past_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for e in range(3):
        log.log({"epoch": e, "loss": float(e)})
    resumed = MetricsLog(tmp_path / "m.jsonl", resume_epoch=1)
    assert [r["epoch"] for r in resumed.read()] == [0]
    line = summary_line(1, 10, {"epoch": 1, "train_loss": 0.123456, "time": 3.21})
    assert line.startswith("epoch  2/10") and "train_loss 0.1235" in line and "time 3.2s" in line


def test_config_file_on_resume_is_merged_over_the_checkpoint_config(tmp_path):
    from vitpe.engine.classification import ClsConfig

    base = apply_overrides(ClsConfig(), ["optim.lr=0.123", "model.pos=rpb", "run.epochs=3"])
    yaml_file = tmp_path / "more.yaml"
    yaml_file.write_text("run:\n  epochs: 9\n")
    args = argparse.Namespace(config=str(yaml_file), set=[])
    cfg = resolve_config(ClsConfig, args, base=base)
    assert (cfg.run.epochs, cfg.optim.lr, cfg.model.pos) == (9, 0.123, "rpb")


@pytest.mark.parametrize("item, said", [
    ("eval.sizes=[16, 0]", "'eval.sizes': [16, 0] is out of range: must be at least 1"),
    ("run.log_interval=0", "'run.log_interval': 0 is out of range"),
    ("data.batch_size=0", "'data.batch_size'"), ("data.workers=-1", "'data.workers'"),
    ("run.epochs=0", "'run.epochs'")])
def test_values_out_of_range_are_named(item, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        apply_overrides(Cfg(), [item])
    apply_overrides(Cfg(), ["data.workers=0", "eval.sizes=[]", "run.epochs=1"])  # the edges are fine


def test_a_flow_mapping_without_a_space_after_the_colon_is_named():
    with pytest.raises(ConfigError, match=re.escape("YAML needs a space after the colon: {depth: 1}")):
        apply_overrides(Cfg(), ["model.kwargs={depth:1}"])
    assert apply_overrides(Cfg(), ["model.kwargs={depth: 1}"]).model.kwargs == {"depth": 1}


# -- checkpoints of a training run ---------------------------------------------------------------
def _state(model: torch.nn.Module) -> dict:
    from vitpe.engine.loop import training_state

    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return training_state(model, opt, sched, 1, {})


def test_weights_that_are_not_finite_are_never_saved():
    from vitpe.engine.loop import NonFiniteLossError

    model = torch.nn.Linear(3, 2)
    assert set(_state(model)) >= {"model", "optimizer", "scheduler", "epoch", "rng"}
    with torch.no_grad():
        model.weight[0, 1] = float("inf")  # an update overflowed on a step whose loss was finite
    with pytest.raises(NonFiniteLossError, match="non-finite model weights after epoch 1.*last checkpoint is intact"):
        _state(model)


def test_resuming_into_another_model_or_from_a_partial_state_names_the_file_and_keys():
    from vitpe.engine.loop import restore_training_state

    state = {**_state(torch.nn.Linear(3, 2)), "source": "runs/a/checkpoint.pt"}
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(other.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(UserError, match=r"runs/a/checkpoint.pt: its weights do not fit this model \(missing "
                                        r"\['0.weight', '0.bias'\]; unexpected \['weight', 'bias'\]\)"):
        restore_training_state(state, other, opt, sched)
    wider = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(wider.parameters())
    with pytest.raises(UserError, match="do not fit this model.*size mismatch for weight"):
        restore_training_state(state, wider, opt, sched)
    with pytest.raises(UserError, match="not a vitpe training checkpoint \\(no optimizer, scheduler, epoch, rng\\)"):
        restore_training_state({"model": state["model"], "source": "w.pt"}, wider, opt, sched)


def test_resume_from_another_tasks_checkpoint_names_it(tmp_path):
    from vitpe.cli import run_training
    from vitpe.engine.classification import ClsConfig
    from vitpe.engine.segmentation import SegConfig

    path = tmp_path / "seg.pt"
    save_checkpoint({"config": to_dict(SegConfig()), "model": {}}, path)
    args = common_parser("t").parse_args(["--resume", str(path)])
    with pytest.raises(CheckpointError, match=f"{path}: not a checkpoint of this script's task"):
        run_training(ClsConfig, args, lambda *a: 0)
    save_checkpoint({"model": {}}, path)
    with pytest.raises(CheckpointError, match="no 'config'"):
        run_training(ClsConfig, args, lambda *a: 0)


def test_temp_files_of_a_killed_save_are_removed_by_the_next(tmp_path):
    (tmp_path / ".checkpoint.pt.k1l3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".best.pt.x.tmp").write_bytes(b"another file's")
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.x.tmp", "checkpoint.pt"]


def test_a_metrics_line_cut_short_is_left_out_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "loss": 0.9}\n{"epoch": 2, "lo')
    resumed = MetricsLog(path, resume_epoch=2)
    assert [r["epoch"] for r in resumed.read()] == [0, 1]
    resumed.log({"epoch": 2, "loss": 0.8})
    assert [r["epoch"] for r in resumed.read()] == [0, 1, 2]


def test_the_default_step_schedule_drops_at_two_thirds_of_training_as_detr():
    from vitpe.engine.optim import lr_factor

    total = 300 * 7  # DETR: x0.1 after 200 of 300 epochs
    at = lambda step: lr_factor(step, total, 0, "step", step_at=OptimConfig().step_at)  # noqa: E731
    assert at(200 * 7 - 1) == 1.0 and at(200 * 7) == pytest.approx(0.1)


@pytest.mark.parametrize("key, value", [("optim.lr", "-0.1"), ("optim.lr", "nan"), ("optim.betas", "[0.9, 1.5]"),
                                        ("aug.label_smoothing", "1.0"), ("run.seed", "99999999999999999999"),
                                        ("data.synthetic_train", "-4"), ("run.device", "tpu"),
                                        # a negative schedule factor or decay: a negative learning rate
                                        ("optim.poly_power", "-2"), ("optim.weight_decay", "-1"),
                                        ("optim.warmup_lr_ratio", "-1"), ("optim.step_gamma", "-1"),
                                        ("optim.min_lr_ratio", "2"), ("optim.warmup_epochs", "-5"),
                                        ("optim.clip_grad", "0"), ("aug.mixup", "-1"), ("aug.re_prob", "2"),
                                        ("aug.hflip", "5"), ("aug.scale", "[0, 0]"), ("aug.scale", "[1.0, 0.1]"),
                                        ("model.kwargs.depth", "-1"), ("model.kwargs.num_heads", "0"),
                                        ("model.kwargs.drop_path_rate", "2"), ("model.kwargs.depth", "abc")])
def test_values_out_of_range_are_named_at_start(key, value):
    from vitpe.engine.classification import ClsConfig

    with pytest.raises(ConfigError, match=re.escape(key)):
        apply_overrides(ClsConfig(), [f"{key}={value}"])


def test_a_key_given_twice_in_a_config_file_is_named(tmp_path):
    from vitpe.engine.classification import ClsConfig

    (tmp_path / "twice.yaml").write_text("optim:\n  lr: 0.1\ndata:\n  batch_size: 8\noptim:\n  epochs_unused: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: cannot read YAML: key 'optim' given twice \(again on line 5\)"):
        load_config(tmp_path / "twice.yaml", ClsConfig)
    (tmp_path / "once.yaml").write_text("optim:\n  lr: 0.1\ndata:\n  batch_size: 8\n")
    assert load_config(tmp_path / "once.yaml", ClsConfig).data.batch_size == 8


def test_the_edges_of_the_ranges_are_allowed():
    from vitpe.engine.classification import ClsConfig

    cfg = apply_overrides(ClsConfig(), ["optim.min_lr_ratio=0", "optim.warmup_lr_ratio=1", "aug.hflip=1",
                                        "optim.clip_grad=null", "aug.scale=[1.0, 1.0]", "optim.poly_power=0",
                                        "model.kwargs.drop_path_rate=0.0", "model.kwargs.global_pool=avg"])
    assert cfg.aug.hflip == 1.0 and cfg.optim.clip_grad is None and cfg.model.kwargs["global_pool"] == "avg"


@pytest.mark.parametrize("override, match", [("eval.modes=[]", "'eval.modes': empty"),
                                             ("eval.scales=[]", "'eval.scales': empty"),
                                             ("eval.scales=[0]", "'eval.scales'"),
                                             ("model.kwargs.depths=[2, 0]", "'model.kwargs.depths'")])
def test_segmentation_evaluation_needs_a_mode_and_positive_scales(override, match):
    from vitpe.engine.segmentation import SegConfig

    with pytest.raises(ConfigError, match=re.escape(match)):
        apply_overrides(SegConfig(), [override])


def test_a_strategy_spec_is_recorded_without_spaces_and_an_empty_part_is_refused():
    from vitpe import pos
    from vitpe.engine.classification import ClsConfig
    from vitpe.engine.detection import DetConfig

    assert apply_overrides(ClsConfig(), ["model.pos= peg + rope_mixed"]).model.pos == "peg+rope_mixed"
    assert apply_overrides(DetConfig(), ["model.backbone_pos=learned + peg"]).model.backbone_pos == "learned+peg"
    for spec in ("peg+", "+rpb", "peg++rope_axial"):
        with pytest.raises(KeyError, match="has an empty part"):
            pos.split(spec)
    assert pos.split("peg + rope_mixed") == ["peg", "rope_mixed"]


def test_a_file_torch_cannot_read_and_a_damaged_state_are_named(tmp_path):
    from vitpe.engine.loop import restore_training_state, training_state
    from vitpe.engine.optim import build_optimizer, build_scheduler

    (tmp_path / "notes.txt").write_text("not a checkpoint at all\n" * 20)
    with pytest.raises(CheckpointError, match="notes.txt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "run").mkdir()  # a run folder given for its checkpoint
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run is a folder \(it holds checkpoint.pt\): give the checkpoint"):
        load_checkpoint(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), 2, 1)
    state = training_state(model, opt, sched, 1, {})
    state["rng"] = {"torch": state["rng"]["torch"]}  # damaged: generators missing
    state["source"] = "run/checkpoint.pt"
    with pytest.raises(UserError, match="run/checkpoint.pt: its training state does not fit this run"):
        restore_training_state(state, model, opt, sched)
