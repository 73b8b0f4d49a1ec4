"""The vitpe / Hugging Face training benchmark runs end to end on CPU with tiny models, so it does not rot."""
import json
import logging
from pathlib import Path

import pytest
from script_modules import load_script

TINY = ["--tiny", "--det-size", "64x96", "--det-batch", "2", "--det-boxes", "3", "--seg-size", "64",
        "--seg-batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--precisions", "fp32"]


def load():
    return load_script("benchmarks/hf_compare.py")


def read(out: Path) -> tuple[list[dict], str]:
    return json.loads((out / "hf_compare.json").read_text())["rows"], (out / "hf_compare.md").read_text()


def test_vitpe_rows_without_transformers_are_measured_and_hf_skipped(tmp_path, monkeypatch, caplog):
    bench = load()
    monkeypatch.setattr(bench, "hf_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hf_compare"):
        bench.main([*TINY, "--rows", "detr_vit_s,mit_b2", "--output", str(tmp_path)])  # detr_r50: the next test
    assert "transformers is not installed" in caplog.text
    rows, table = read(tmp_path)
    assert [r["row"] for r in rows] == ["detr_vit_s", "mit_b2"]
    for r in rows:
        assert r["vitpe"]["img_s"] > 0 and "hf" not in r and "ratio" not in r
    assert [r["size"] for r in rows] == ["64x96", "64x64"]
    assert table.count("\n") == 2 + len(rows)


def test_rows_measured_before_a_failure_are_kept(tmp_path, monkeypatch):
    bench = load()
    monkeypatch.setattr(bench, "hf_available", lambda: False)

    def broken(*_):
        raise RuntimeError("broken row")
    monkeypatch.setitem(bench.SPECS, "detr_vit_s", ("-", bench.det_batch, broken, None))
    with pytest.raises(RuntimeError, match="broken row"):
        bench.main([*TINY, "--rows", "mit_b2,detr_vit_s", "--output", str(tmp_path)])
    rows, _ = read(tmp_path)
    assert [r["row"] for r in rows] == ["mit_b2"]


def test_pad_to_marks_only_the_added_cells():
    import torch

    bench = load()
    images, mask = bench.pad_to(torch.ones(2, 3, 5, 7), 4)
    assert images.shape == (2, 3, 8, 8) and mask.shape == (2, 8, 8)
    assert not mask[:, :5, :7].any() and mask[:, 5:].all() and mask[:, :, 7:].all()
    assert images[:, :, :5, :7].eq(1).all() and images[mask[:, None].expand_as(images)].eq(0).all()


def test_side_by_side_with_transformers_and_a_profile(tmp_path):
    pytest.importorskip("transformers")
    bench = load()
    bench.main([*TINY, "--rows", "detr_r50,mit_b2", "--profile", "5", "--output", str(tmp_path)])
    rows, table = read(tmp_path)
    for r in rows:
        assert r["hf"]["img_s"] > 0
        assert r["ratio"] == pytest.approx(r["vitpe"]["img_s"] / r["hf"]["img_s"])
    assert table.count("\n") == 2 + len(rows)
    profile = (tmp_path / "hf_compare_profile.txt").read_text()
    assert [line for line in profile.splitlines() if line.startswith("## ")] == [
        "## detr_r50 fp32 vitpe (3 steps)", "## detr_r50 fp32 hf (3 steps)",
        "## mit_b2 fp32 vitpe (3 steps)", "## mit_b2 fp32 hf (3 steps)"]


def test_unknown_row_is_a_usage_error(capsys):
    bench = load()
    with pytest.raises(SystemExit) as e:
        bench.parse(["--rows", "detr_r51"])
    assert e.value.code == 2 and "unknown row or precision 'detr_r51'" in capsys.readouterr().err
