"""The throughput benchmark runs end to end on CPU with a tiny setting, so it does not rot."""
import json

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
                "--batch-size", "2", "--steps", "1", "--warmup", "1", "--depth", "1", "--device", "cpu",
                "--no-bf16", "--no-reference", "--output", str(tmp_path)])
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert all(r["timm"] is None and r["train_ratio"] is None and r["reference"] is None for r in rows.values())
    assert rows["rpb"]["train_vs_learned"] == rows["rpb"]["vitpe"]["train_img_s"] / rows["learned"]["vitpe"]["train_img_s"]
    assert "| rpb | 32 | eager | - |" in (tmp_path / "throughput.md").read_text()
