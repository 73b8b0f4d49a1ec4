"""The throughput benchmark runs end to end on CPU with a tiny setting, so it does not rot."""
import json
from pathlib import Path

import pytest
import torch

from script_modules import load_script


def load(name: str):
    return load_script(f"benchmarks/{name}.py")


def test_throughput_benchmark_writes_side_by_side_rows(tmp_path):
    bench = load("throughput")
    bench.main(["--sizes", "small", "--strategies", "learned,rope_mixed,peg", "--resolutions", "32",
                "--modes", "eager", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "throughput.json").read_text())
    refs = {r["strategy"]: r["reference"] for r in data["rows"]}
    assert refs == {"learned": "vit_small_patch16_224", "rope_mixed": "vit_small_patch16_rope_mixed_224",
                    "peg": "vit_small_patch16_224"}
    for r in data["rows"]:
        assert r["train_ratio"] > 0 and r["infer_ratio"] > 0
        assert r["vitpe"]["train_img_s"] > 0 and r["timm"]["infer_img_s"] > 0
    rows = {r["strategy"]: r for r in data["rows"]}
    assert rows["learned"]["train_vs_learned"] == 1.0  # its own baseline
    assert rows["peg"]["infer_vs_learned"] == rows["peg"]["vitpe"]["infer_img_s"] / rows["learned"]["vitpe"]["infer_img_s"]
    table = (tmp_path / "throughput.md").read_text()
    assert table.count("\n") == 2 + len(data["rows"])


def test_throughput_without_reference_times_only_vitpe(tmp_path):
    bench = load("throughput")
    bench.main(["--sizes", "small", "--strategies", "learned,rpb", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "2", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--no-reference", "--output", str(tmp_path)])
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert all(r["vitpe"]["train_spread"] >= 0 and r["vitpe"]["infer_spread"] >= 0 for r in rows.values())
    assert all(r["timm"] is None and r["train_ratio"] is None and r["reference"] is None for r in rows.values())
    assert rows["rpb"]["train_vs_learned"] == rows["rpb"]["vitpe"]["train_img_s"] / rows["learned"]["vitpe"]["train_img_s"]
    assert "| rpb | 32 | eager | - |" in (tmp_path / "throughput.md").read_text()


def test_throughput_grad_checkpointing_builds_both_sides_with_it(tmp_path, monkeypatch):
    bench = load("throughput")
    built, build = [], bench.build

    def recording(*a, **kw):
        built.append(build(*a, **kw))
        return built[-1]

    monkeypatch.setattr(bench, "build", recording)
    bench.main(["--sizes", "small", "--strategies", "rope_mixed", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--grad-checkpointing", "--output", str(tmp_path)])
    assert sorted(type(m).__module__.split(".")[0] for m in built) == ["timm", "vitpe"]
    assert all(m.grad_checkpointing for m in built)
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["args"]["grad_checkpointing"] == "True" and data["rows"][0]["vitpe"]["train_img_s"] > 0


def test_checkpoint_memory_counts_what_autograd_keeps_with_and_without(tmp_path):
    bench = load("checkpoint_memory")
    bench.main(["--models", "vitpe_vit_tiny_patch16_224:rope_mixed,vit_tiny_patch16_224", "--batch", "1",
                "--size", "32", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "checkpoint_memory.json").read_text())["rows"]
    assert [(r["model"], r["pos"]) for r in rows] == [("vitpe_vit_tiny_patch16_224", "rope_mixed"),
                                                       ("vit_tiny_patch16_224", "-")]
    assert all(0 < r["checkpointed_mib"] < 0.5 * r["kept_mib"] for r in rows)
    # the count by hand for one linear layer: its input (the weight is a parameter, left out)
    x = torch.randn(4, 8, requires_grad=True)
    assert bench.saved_activation_bytes(torch.nn.Linear(8, 3), x) == 4 * 8 * 4
    assert (tmp_path / "checkpoint_memory.md").read_text().count("\n") == 2 + len(rows)


def test_throughput_interleaves_the_models_windows(tmp_path, monkeypatch):
    bench = load("throughput")
    calls = []
    timed = bench.timed

    def recording(step, steps, warmup, device):
        calls.append(step)
        return timed(step, steps, warmup, device)

    monkeypatch.setattr(bench, "timed", recording)
    bench.main(["--sizes", "small", "--strategies", "learned,peg", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "2", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--interleave", "--output", str(tmp_path)])
    # three models (timm's ViT, vitpe learned, vitpe peg): every model's first window before any
    # model's second, training then inference
    train, infer = calls[:6], calls[6:]
    assert len(calls) == 12 and len(set(train[:3])) == 3 and train[3:] == train[:3]
    assert len(set(infer[:3])) == 3 and infer[3:] == infer[:3] and not set(train) & set(infer)
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert rows["learned"]["reference"] == rows["peg"]["reference"] == "vit_small_patch16_224"
    assert rows["peg"]["timm"] == rows["learned"]["timm"]  # one measurement of the shared reference
    peg, learned = rows["peg"]["vitpe"], rows["learned"]["vitpe"]
    assert rows["peg"]["train_vs_learned"] == peg["train_img_s"] / learned["train_img_s"]


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("stage", ["build", "warm-up"])
def test_a_model_that_fails_is_named_and_the_others_are_measured(tmp_path, monkeypatch, capsys, interleave, stage):
    bench = load("throughput")
    if stage == "build":
        build = bench.build

        def failing_build(name, res, depth, **kw):
            if kw.get("pos") == "peg":
                raise RuntimeError("boom\nsecond line")
            return build(name, res, depth, **kw)

        monkeypatch.setattr(bench, "build", failing_build)
    else:
        warm = bench.Bench.warm_train

        def failing_warm(self):
            if "peg" in self.label:
                raise RuntimeError("boom\nsecond line")
            return warm(self)

        monkeypatch.setattr(bench.Bench, "warm_train", failing_warm)
    bench.main(["--sizes", "small", "--strategies", "learned,peg,rpb", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "2", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--no-reference", "--output", str(tmp_path)]
               + (["--interleave"] if interleave else []))
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert rows["peg"]["vitpe"] == {"error": "RuntimeError: boom"}
    assert rows["peg"]["train_vs_learned"] is None
    assert rows["rpb"]["train_vs_learned"] == rows["rpb"]["vitpe"]["train_img_s"] / rows["learned"]["vitpe"]["train_img_s"]
    table = (tmp_path / "throughput.md").read_text()
    assert "| small | peg | 32 | eager | - | failed: RuntimeError: boom |" in table
    assert table.count("\n") == 2 + 3 and all(line.count("|") == 16 for line in table.splitlines())
    assert "vitpe small peg 32 eager: failed" in capsys.readouterr().err


def test_a_rate_is_the_median_window_with_the_windows_spread():
    bench = load("throughput")
    median, spread = bench.median_spread([0.3, 0.1, 0.2])  # windows of known length
    assert median == 0.2 and abs(spread - (0.3 - 0.1) / 0.2) < 1e-12
    assert bench.median_spread([0.010, 0.012])[0] == pytest.approx(0.011)  # not the slower of two


def test_throughput_profile_lists_each_measurement(tmp_path):
    bench = load("throughput")
    bench.main(["--sizes", "small", "--strategies", "learned", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--depth", "1", "--device", "cpu",
                "--no-bf16", "--no-reference", "--profile", "5", "--output", str(tmp_path)])
    text = (tmp_path / "throughput_profile.txt").read_text()
    assert text.count("## ") == 1 and "## vitpe small learned 32 eager train (3 steps)" in text
    assert "aten::" in text  # the operators' table


def test_attention_kernels_bias_gradient_matches_float32_math(tmp_path):
    bench = load("attention_kernels")
    rows = bench.run(bench.parse(["--shape", "2,2,9,8", "--kernels", "sdpa:math,vitpe", "--steps", "1",
                                  "--warmup", "0", "--device", "cpu", "--output", str(tmp_path)]))
    assert [(r["kernel"], r["bias"]) for r in rows] == [("sdpa:math", False), ("sdpa:math", True),
                                                        ("vitpe", False), ("vitpe", True)]
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["bias_grad_rel_err"] < 1e-5 for r in rows if r["bias"])  # float32 on CPU
    assert (tmp_path / "attention_kernels.md").read_text().count("\n") == 2 + len(rows)


def test_attention_kernels_reports_a_backend_that_refuses(tmp_path):
    bench = load("attention_kernels")
    rows = bench.run(bench.parse(["--shape", "1,1,4,8", "--kernels", "sdpa:efficient", "--steps", "1", "--warmup", "0",
                                  "--device", "cpu", "--tiles", "", "BWD_BLOCK_M=16", "--output", str(tmp_path)]))
    assert all(r["ms"] is None and r["error"] for r in rows)  # no efficient-attention kernel on CPU: reported, not timed
    assert [r["tiles"] for r in rows] == ["default", "default", "BWD_BLOCK_M=16", "BWD_BLOCK_M=16"]
    with pytest.raises(SystemExit):
        bench.parse(["--tiles", "BWD_BLOCK_M=big"])


def test_depthwise_kernels_smoke_writes_a_row_per_shape_and_variant(tmp_path):
    bench = load("depthwise_kernels")
    rows = bench.run(bench.parse(["--smoke", "--device", "cpu", "--output", str(tmp_path)]))
    assert [(tuple(r["shape"]), r["variant"]) for r in rows] == [
        (s, v) for s in bench.SMOKE_SHAPES for v in ("copy", "unfused", "fused", "cudnn")]
    assert all(r["fwd_ms"] > 0 and r["passes"] > 0 for r in rows)
    assert all(not r["kernel"] for r in rows)  # on CPU: GridConv's torch path
    assert all(r["max_err"] < 1e-5 for r in rows if r["variant"] != "copy")
    data = json.loads((tmp_path / "depthwise_kernels.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "depthwise_kernels.md").read_text().count("\n") == 2 + len(rows)


def test_depthwise_kernels_times_only_the_variants_asked_for(tmp_path):
    bench = load("depthwise_kernels")
    rows = bench.run(bench.parse(["--smoke", "--device", "cpu", "--variants", "fused", "--output", str(tmp_path)]))
    assert [(tuple(r["shape"]), r["variant"]) for r in rows] == [(s, v) for s in bench.SMOKE_SHAPES
                                                                 for v in ("copy", "fused")]
    assert all(r["max_err"] < 1e-5 for r in rows if r["variant"] == "fused")  # still against cuDNN's output
    with pytest.raises(SystemExit):
        bench.parse(["--variants", "fused,triton"])


def test_depthwise_kernels_a_variant_that_fails_is_a_row_with_its_error(tmp_path, monkeypatch):
    bench = load("depthwise_kernels")
    forward_of = bench.forward_of

    def failing(variant, conv, grid, num_prefix, input_bias):
        fn = forward_of(variant, conv, grid, num_prefix, input_bias)
        if variant != "fused":
            return fn

        def broken(x):
            raise RuntimeError("out of resources: shared memory")
        return broken

    monkeypatch.setattr(bench, "forward_of", failing)
    rows = bench.run(bench.parse(["--smoke", "--device", "cpu", "--output", str(tmp_path)]))
    fused = [r for r in rows if r["variant"] == "fused"]
    assert fused and all(r["error"] == "RuntimeError: out of resources: shared memory" and r["fwd_ms"] is None
                         for r in fused)
    assert all(r["fwd_ms"] > 0 for r in rows if r["variant"] != "fused")  # the sweep went on
    assert "| failed: RuntimeError: out of resources: shared memory |" in (tmp_path / "depthwise_kernels.md").read_text()


def test_depthwise_kernels_names_the_longest_kernels_of_a_row():
    bench = load("depthwise_kernels")
    row = {"_conv_kernel": 411.2, "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float> >(float*)": 6.4,
           "_prefix_kernel": 4.1, "_weight_grad3_kernel": 205.7}
    ordered = dict(sorted(row.items(), key=lambda kv: -kv[1]))
    assert bench.largest(ordered) == "_conv_kernel 411, _weight_grad3_kernel 206, reduce_kernel 6"
    assert bench.largest(ordered, n=1) == "_conv_kernel 411"
    assert bench.largest({}) == "-"


def test_depthwise_kernels_times_each_tile_setting_and_restores_the_module(tmp_path, capsys, monkeypatch):
    from vitpe.kernels import depthwise

    bench = load("depthwise_kernels")
    before = depthwise.CONV_TILE, depthwise.WG_WARPS
    seen = []  # what each shape's timing sees of the module
    monkeypatch.setattr(bench, "time_shape",
                        lambda shape, args, tiles: seen.append((tiles, depthwise.CONV_TILE, depthwise.WG_WARPS)) or [])
    bench.run(bench.parse(["--smoke", "--shapes", "1,2,3,4,1", "--tiles", "", "CONV_TILE=512,WG_WARPS=2",
                           "--device", "cpu", "--output", str(tmp_path)]))
    assert seen == [("default", *before), ("CONV_TILE=512,WG_WARPS=2", 512, 2)]
    assert (depthwise.CONV_TILE, depthwise.WG_WARPS) == before
    with pytest.raises(SystemExit):
        bench.parse(["--tiles", "BLOCK_Q=16"])
    assert "'BLOCK_Q=16' is not NAME=INTEGER for a tile constant" in capsys.readouterr().err


def test_throughput_times_the_models_again_under_each_kernel_setting(tmp_path, capsys, monkeypatch):
    from vitpe.kernels import depthwise

    bench = load("throughput")
    before = depthwise.CONV_TILE
    seen, resets = [], []
    real = bench.measure

    def measure(model, args, res, compiled, label):  # what each measurement sees of the kernel module
        seen.append((label, depthwise.CONV_TILE))
        return real(model, args, res, compiled, label)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench.torch._dynamo, "reset", lambda: resets.append(depthwise.CONV_TILE))
    bench.main(["--sizes", "small", "--strategies", "learned,mixffn", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--output", str(tmp_path),
                "--kernel-settings", "", "depthwise:CONV_TILE=512,CONV_WARPS=2"])
    # learned and timm's model once, under the first setting; mixffn under each
    assert seen == [("vit_small_patch16_224 32 eager", before), ("vitpe small learned 32 eager", before),
                    ("vitpe small mixffn 32 eager", before),
                    ("vitpe small mixffn 32 eager [depthwise:CONV_TILE=512,CONV_WARPS=2]", 512)]
    assert depthwise.CONV_TILE == before and len(resets) == 4  # compiled code dropped on entering and leaving each
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [(r["strategy"], r["kernels"]) for r in rows] == [
        ("learned", "default"), ("mixffn", "default"), ("mixffn", "depthwise:CONV_TILE=512,CONV_WARPS=2")]
    learned, last = rows[0]["vitpe"], rows[2]
    assert last["train_vs_learned"] == last["vitpe"]["train_img_s"] / learned["train_img_s"]  # the first's baseline
    assert last["timm"] == rows[0]["timm"] and last["train_ratio"] > 0
    assert "| depthwise:CONV_TILE=512,CONV_WARPS=2 |" in (tmp_path / "throughput.md").read_text()
    for bad, said in (("depthwise:NOPE=1", "'NOPE=1' is not NAME=INTEGER"), ("conv:CONV_TILE=1", "'conv:CONV_TILE=1'"),
                      ("CONV_TILE=1", "is not MODULE:NAME=V")):
        with pytest.raises(SystemExit):
            bench.parse(["--kernel-settings", bad])
        assert said in capsys.readouterr().err


def test_interleaved_settings_each_time_learned_alongside(tmp_path):
    bench = load("throughput")
    bench.main(["--sizes", "small", "--strategies", "learned,mixffn", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--no-reference", "--interleave", "--output", str(tmp_path),
                "--kernel-settings", "", "depthwise:CONV_TILE=512"])
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [(r["strategy"], r["kernels"]) for r in rows] == [
        ("learned", "default"), ("mixffn", "default"), ("learned", "depthwise:CONV_TILE=512"),
        ("mixffn", "depthwise:CONV_TILE=512")]
    rate = [r["vitpe"]["train_img_s"] for r in rows]
    assert rows[1]["train_vs_learned"] == rate[1] / rate[0]
    assert rows[3]["train_vs_learned"] == rate[3] / rate[2]  # the learned timed in the same turns
    assert rows[2]["train_vs_learned"] == rate[2] / rate[0]  # what the setting changes for learned


def test_a_bias_gelu_setting_times_learned_again_against_the_first(tmp_path, monkeypatch):
    """Each setting is in force while its model is measured, with torch's compile caches off (their
    keys do not see the kernels' constants), and everything is restored afterwards."""
    from vitpe.kernels import bias_gelu

    bench = load("throughput")
    seen = []
    real = bench.measure

    def measure(model, args, res, compiled, label):
        seen.append((label, bias_gelu.IN_MLP, torch.compiler.config.force_disable_caches))
        return real(model, args, res, compiled, label)

    monkeypatch.setattr(bench, "measure", measure)
    bench.main(["--sizes", "small", "--strategies", "learned", "--resolutions", "32", "--modes", "eager",
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--repeats", "1", "--depth", "1",
                "--device", "cpu", "--no-bf16", "--no-reference", "--output", str(tmp_path),
                "--kernel-settings", "", "bias_gelu:IN_MLP=0"])
    assert seen == [("vitpe small learned 32 eager", 1, True),
                    ("vitpe small learned 32 eager [bias_gelu:IN_MLP=0]", 0, True)]
    first, again = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert again["kernels"] == "bias_gelu:IN_MLP=0" and bias_gelu.IN_MLP == 1
    assert not torch.compiler.config.force_disable_caches
    assert again["train_vs_learned"] == again["vitpe"]["train_img_s"] / first["vitpe"]["train_img_s"]


def test_inductor_settings_are_checked_and_in_force_while_the_benchmark_runs(monkeypatch, capsys):
    bench = load("throughput")
    from torch._inductor import config

    seen = {}
    monkeypatch.setattr(bench, "run", lambda args: seen.update(cdt=config.coordinate_descent_tuning,
                                                               tiles=config.triton.tile_reductions))
    before = (config.coordinate_descent_tuning, config.triton.tile_reductions)
    bench.main(["--device", "cpu", "--inductor", "coordinate_descent_tuning=True,triton.tile_reductions=True"])
    assert seen == {"cdt": True, "tiles": True}
    assert (config.coordinate_descent_tuning, config.triton.tile_reductions) == before  # restored after
    for bad, message in [("tile_reductions=True", "did you mean triton.tile_reductions"),
                         ("coordinate_descent_tuning=1", "takes a bool, not int"),
                         ("coordinate_descent_tuning=yes", "is not a Python literal")]:
        with pytest.raises(SystemExit):
            bench.parse(["--inductor", bad])
        assert message in capsys.readouterr().err



def _flops_run(device: str, output: str) -> None:
    load("throughput").main(["--sizes", "small", "--strategies", "learned,rpb,mixffn", "--resolutions", "32",
                             "--modes", "eager", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                             "--repeats", "1", "--depth", "1", "--device", device, "--no-bf16", "--no-reference",
                             "--output", output])


def compare(device: str, output: str) -> None:
    """The run of ``test_flops_include_the_work_of_vitpes_kernels`` in Triton's interpreter, where
    vitpe's kernels take rpb's attention and mixffn's convolution."""
    _flops_run(device, output)


def test_flops_include_the_work_of_vitpes_kernels(tmp_path):
    """The FLOPs counted per image are the same whether vitpe's kernels run (in the interpreter)
    or torch's operators do (outside it): the counter does not see into the kernels."""
    from pathlib import Path

    from triton_interpreter import run_compare_in_interpreter

    pytest.importorskip("triton")
    run_compare_in_interpreter("test_benchmarks", output=str(tmp_path / "kernels"))
    _flops_run("cpu", str(tmp_path / "torch"))

    def per_image(run: str) -> dict[str, float]:
        rows = json.loads((Path(tmp_path / run) / "throughput.json").read_text())["rows"]
        return {r["strategy"]: r["vitpe"]["train_tflops"] * 1e12 / r["vitpe"]["train_img_s"] for r in rows}

    kernels, torch_ops = per_image("kernels"), per_image("torch")
    for strategy in ("learned", "rpb", "mixffn"):
        assert kernels[strategy] == pytest.approx(torch_ops[strategy], rel=1e-9), strategy
    # mixffn adds the 3x3 depthwise convolution of the hidden layer: 2 * 9 FLOPs per element, 3x for training
    hidden = 4 * 384 * (32 // 16) ** 2
    assert kernels["mixffn"] == pytest.approx(kernels["learned"] + 3 * 2 * 9 * hidden, rel=1e-6)


def test_depthwise_resources_records_the_kernels_each_setting_launches():
    """The host code runs on data-less tensors and its launches are recorded, not made: the
    settings route Mix-FFN's calls to the kernels they name, with the JIT's specialisation."""
    pytest.importorskip("triton")
    bench = load("depthwise_resources")
    from vitpe.kernels import depthwise

    def kernels(call, spec=""):
        with bench.tile_settings(depthwise, spec):
            return [(launch.kernel.fn.__name__, launch.kwargs.get("ACT"))
                    for launch in bench.calls_of((2, 3, 4, 8, 1), call, torch.bfloat16)]

    two = "BWD_MERGED=0,SAVE_GELU_GRAD=0"  # the backward in two kernels, the GELU's derivative recomputed
    # the forward's convolution kernel writes the prefix row too; the backward launches a kernel for it
    assert kernels("forward") == kernels("forward", two) == [("_conv_staged_kernel", None)]
    assert kernels("backward", two) == [("_prefix_kernel", None), ("_weight_grad_staged_kernel", None),
                                        ("_conv_staged_kernel", None)]
    assert kernels("gelu_forward", two) == [("_conv_kernel", 1)]
    assert kernels("gelu_backward", two)[0] == ("_conv_kernel", 2)  # the pre-activation recomputed
    # the default: one backward kernel, the GELU's derivative written by the forward
    assert kernels("backward") == [("_prefix_kernel", None), ("_backward_staged_kernel", None)]
    assert kernels("gelu_forward") == [("_conv_kernel", 3)]
    assert kernels("gelu_backward") == [("_prefix_kernel", None), ("_backward_staged_kernel", None)]
    # GELU_TILE sizes the convolution with the GELU inside, CONV_TILE the one without
    with bench.tile_settings(depthwise, "GELU_TILE=1024"):
        plain, gelu = (bench.calls_of((2, 3, 16, 256, 1), call, torch.bfloat16)[0].kwargs["BLOCK_C"]
                       for call in ("forward", "gelu_forward"))
    assert (plain, gelu) == (128, 64)
    # by default the GELU's tile follows the grid's width: 1024 elements while a strip row keeps 64
    # channels (16 columns: ViT-S at 224), else 2048 (32 columns)
    for width, tile in ((16, None), (32, None), (16, "GELU_TILE=2048")):
        with bench.tile_settings(depthwise, tile or ""):
            block_c = bench.calls_of((2, 3, width, 256, 1), "gelu_forward", torch.bfloat16)[0].kwargs["BLOCK_C"]
        assert block_c == {(16, None): 64, (32, None): 64, (16, "GELU_TILE=2048"): 128}[width, tile]
    # STRIP_FIT: a 14-wide grid in strips of 2 columns x 512 channels (no idle lanes where 16-column
    # strips idle 2 of 16), a 24-wide one in 8 columns; a 16-wide grid keeps its strip
    for width, want in ((14, (2, 512)), (24, (8, 128)), (16, (16, 64))):
        with bench.tile_settings(depthwise, "STRIP_FIT=1"):
            kw = bench.calls_of((2, 3, width, 1536, 1), "gelu_forward", torch.bfloat16)[0].kwargs
        assert (kw["BLOCK_W"], kw["BLOCK_C"]) == want, width
    launch = bench.calls_of((2, 3, 4, 8, 1), "forward", torch.bfloat16)[0]
    sig, consts, attrs = bench.signature(launch)
    names = [p.name for p in launch.kernel.params]
    assert sig["x_ptr"] == "*bf16" and sig["w_ptr"] == "*fp32" and sig["H"] == "i32"
    assert (names.index("x_ptr"),) in attrs and (names.index("H"),) not in attrs  # 16-aligned pointers; H = 3
    assert sig["n_chunks"] == "constexpr" and consts["n_chunks"] == 1  # an integer equal to 1
    assert consts["BLOCK_W"] == 4 and consts["EVEN_C"] is False


def test_depthwise_resources_compiles_for_the_gpu_offline(tmp_path):
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "cuobjdump").exists():
        pytest.skip("this Triton ships no cuobjdump")
    bench = load("depthwise_resources")
    # ViT-S's Mix-FFN tile on two images of three rows
    rows = bench.run(bench.parse(["--shapes", "2,3,14,1536,1", "--calls", "forward", "--output", str(tmp_path)]))
    assert [r["kernel"] for r in rows] == ["_conv_staged_kernel"]
    assert all(0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["warps"] == 4 for r in rows), rows
    assert rows[0]["shared_bytes"] > 0  # the pipelined rows ahead are copied into shared memory
    if (tools / "nvdisasm").exists():
        # the row walk holds the 9 taps' products (a multiply, then multiply-adds) of a thread's tile elements
        consts = dict(kv.split("=") for kv in rows[0]["constants"].split(","))
        per_thread = int(consts["BLOCK_W"]) * int(consts["BLOCK_C"]) / (32 * 4)
        mix = rows[0]["loop_mix"]
        assert mix.get("FFMA", 0) + mix.get("FMUL", 0) >= 9 * per_thread, mix
        assert rows[0]["loop_instructions"] == sum(rows[0]["loop_mix"].values())
        assert rows[0]["loop_per_element"] == pytest.approx(rows[0]["loop_instructions"] / per_thread, abs=0.01)
    data = json.loads((tmp_path / "depthwise_resources.json").read_text())
    assert data["target"] == "sm_90" and len(data["rows"]) == 1
    assert (tmp_path / "depthwise_resources.md").read_text().count("\n") == 2 + len(rows)


def test_depthwise_resources_counts_the_longest_loop_of_a_listing():
    bench = load("depthwise_resources")
    sass = """
        .text.k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
.L_x_1:
        /*0020*/                   FMUL R5, R2, R2 ;
        /*0030*/              @P0  BRA `(.L_x_1) ;
        /*0040*/                   SHF.L.U32 R6, R7, 0x10, RZ ;
        /*0050*/              @!P1 BRA `(.L_x_0) ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0070*/                   EXIT ;
.L_x_3:
        /*0080*/                   BRA `(.L_x_3);
"""
    # the outer loop (0x10 to its branch back at 0x50) holds the inner one; the forward branch is no loop
    assert bench.loop_instructions(sass) == (5, {"BRA": 2, "FFMA": 1, "FMUL": 1, "SHF": 1})
    assert bench.loop_instructions("        /*0000*/   EXIT ;\n.L_x_9:\n        /*0010*/   BRA `(.L_x_9);") == (0, {})


def test_step_ceiling_sums_the_products_and_attention_of_every_block(tmp_path):
    bench = load("step_ceiling")
    r = bench.main(["--size", "tiny", "--depth", "2", "--batch-size", "2", "--resolution", "32", "--square", "64",
                    "--calls", "2", "--device", "cpu", "--output", str(tmp_path)])
    assert r["tokens"] == 5 and len(r["products"]) == 12  # 4 products x forward, two gradients
    assert {p["product"]: p["gflop"] for p in r["products"] if p["part"] == "forward"} == pytest.approx(
        {"qkv": 2 * 10 * 192 * 576 / 1e9, "proj": 2 * 10 * 192 * 192 / 1e9, "fc1": 2 * 10 * 192 * 768 / 1e9,
         "fc2": 2 * 10 * 768 * 192 / 1e9})
    assert r["products_ms"] == pytest.approx(2 * sum(p["ms"] for p in r["products"]))
    assert r["ceiling_ms"] == pytest.approx(r["products_ms"] + 2 * r["attention_ms_per_block"])
    assert r["ceiling_tflops"] == pytest.approx(r["ceiling_gflop"] / r["ceiling_ms"])
    saved = json.loads((tmp_path / "step_ceiling.json").read_text())["rows"][0]
    assert saved["ceiling_share_of_peak"] == pytest.approx(r["ceiling_tflops"] / 798)
    assert "both: the step's ceiling" in (tmp_path / "step_ceiling.md").read_text()
