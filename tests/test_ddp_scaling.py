"""The data-parallel scaling benchmark runs on CPU with gloo and a tiny ViT: one process in this
one, two under torchrun, both in one JSON and one table; the replicas stay identical under DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import SUBPROCESS_LIMIT_S, load_script, torchrun

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--no-amp", "--model", "vitpe_vit_tiny_patch4_32", "--img-size", "32", "--depth", "1",
        "--embed-dim", "32", "--num-heads", "2", "--batch-size", "4", "--steps", "2", "--warmup", "1"]


def scaling_module():
    return load_script("benchmarks/ddp_scaling.py")


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_one_and_two_gloo_processes_fill_one_table(tmp_path, monkeypatch):
    bench = scaling_module()
    out = tmp_path / "scaling.json"
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    bench.main([*TINY, "--output", str(out)])  # one process, no process group
    torchrun("benchmarks/ddp_scaling.py", [*TINY, "--output", str(out)], tmp_path / "logs")
    data = json.loads(out.read_text())
    one, two = data["runs"]["1"], data["runs"]["2"]
    assert (one["global_batch"], two["global_batch"]) == (4, 8)
    assert (one["backend"], two["backend"]) == ("none", "gloo")
    assert two["replicas_in_sync"] and one["img_s"] > 0 and two["img_s"] > 0
    assert two["img_s"] == pytest.approx(2 * two["img_s_per_process"])
    table = bench.markdown(data).splitlines()
    assert table[-2].startswith("| 1 | 4 |") and "| 1.00x | 100% | True |" in table[-2]
    ratio = two["img_s"] / one["img_s"]
    assert table[-1].startswith("| 2 | 8 |") and f"| {ratio:.2f}x | {ratio / 2:.0%} | True |" in table[-1]


def test_a_file_measured_with_other_settings_is_started_afresh(tmp_path):
    bench = scaling_module()
    out = tmp_path / "scaling.json"
    result = {"processes": 1, "img_s": 10.0}
    bench.update_json(out, bench.parse([*TINY]), result)
    bench.update_json(out, bench.parse([*TINY]), {**result, "processes": 2})
    assert set(json.loads(out.read_text())["runs"]) == {"1", "2"}
    bench.update_json(out, bench.parse([*TINY, "--batch-size", "8"]), result)
    assert set(json.loads(out.read_text())["runs"]) == {"1"}


@pytest.mark.slow
def test_the_driver_launches_each_count_and_prints_the_ratio(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ddp_scaling.py"), "--driver", "1,2", *TINY,
           "--output", str(out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(out.read_text())["runs"]) == {"1", "2"}
    assert "| 2 | 8 |" in proc.stdout and (tmp_path / "scaling.md").read_text().strip() in proc.stdout


def test_compile_under_ddp_picks_dynamos_graph_split_and_the_config_checks_the_name():
    import torch._dynamo

    from vitpe.config import ConfigError, RunConfig, from_dict
    from vitpe.engine.distributed import compile_under_ddp

    saved = torch._dynamo.config.optimize_ddp
    try:
        compile_under_ddp("buckets")
        assert torch._dynamo.config.optimize_ddp is True
        compile_under_ddp("one_graph")
        assert torch._dynamo.config.optimize_ddp is False
        with pytest.raises(ValueError, match="run.compile_ddp.*'graph'"):
            compile_under_ddp("graph")
    finally:
        torch._dynamo.config.optimize_ddp = saved
    assert RunConfig().compile_ddp == "one_graph"
    assert from_dict(RunConfig, {"compile_ddp": "buckets"}).compile_ddp == "buckets"
    with pytest.raises(ConfigError, match="compile_ddp"):
        from_dict(RunConfig, {"compile_ddp": "one"})
    bench = scaling_module()
    settings = vars(bench.parse([*TINY, "--compile", "--compile-ddp", "buckets"]))
    assert bench.compiled(settings) == "compiled (buckets under DDP)"
    assert bench.compiled(vars(bench.parse(TINY))) == "eager"
