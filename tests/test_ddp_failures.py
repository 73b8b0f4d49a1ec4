"""A data-parallel job whose process dies, errs or hangs ends with a clear error instead of hanging:
torchrun (gloo, 2 CPU processes) with a rank killed by SIGKILL as by the OOM killer, a user
error on one rank, and a collective whose peer never arrives (the process-group timeout)."""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vitpe.engine import distributed as dist
from vitpe.errors import UserError
from script_modules import load_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads torchrun's workers from /proc")


def check_module():
    return load_script("benchmarks/ddp_check.py")


@pytest.fixture(scope="module")
def check():
    return check_module()


# How long a job may take to start and end here. Generous, since a loaded 2-core machine can take
# minutes to start two torch processes; the jobs get a collective timeout longer than it
# (``job_env``), so a job that ends within it was ended by the failure, not by that timeout.
LIMIT_S = 600


def job_env(check) -> dict[str, str]:
    return dict(check.child_env(1), VITPE_DIST_TIMEOUT=str(3 * LIMIT_S))


def cls_job(check, out: Path, epochs: int = 500) -> list[str]:
    """A tiny 2-process synthetic-task run, long enough never to finish by itself here."""
    return check.command(2, "train_cls.py", [*check.PROFILES["tiny"]["cls"], "--epochs", str(epochs),
                                             "--output", str(out)])


def test_a_rank_killed_mid_training_ends_the_job_within_seconds_naming_it(check, tmp_path):
    log = tmp_path / "job.log"
    proc = check.start(cls_job(check, tmp_path / "run"), log, job_env(check))
    try:
        assert check.wait_for(log, r"epoch\s+1/500", proc, LIMIT_S), log.read_text()[-3000:]
        got = check.kill_rank(proc, 1, timeout=LIMIT_S)
    finally:
        check.finish(proc, 1)
    assert got["exit_code"] not in (0, -9), got  # -9: the test had to kill a hung job itself
    assert got["exit_after_kill_s"] < LIMIT_S
    # torchrun's summary lists every failed rank as a "[n]:" block. Rank 1's SIGKILL is usually the
    # root cause, but under load rank 0's own error (its peer vanished mid-collective) can be
    # recorded first; either way the killed rank must be named with its signal.
    summary = log.read_text().split("Failures:")[-1]
    blocks = re.split(r"\n\[\d+\]:\n", summary)
    assert any("rank      : 1" in b and "Signal 9 (SIGKILL)" in b for b in blocks), summary[-3000:]


def test_an_error_on_one_rank_ends_every_rank_with_one_clear_line(check, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # only rank 0 creates the output folder, and it cannot under a file
    log = tmp_path / "job.log"
    code = check.finish(check.start(cls_job(check, blocker / "run"), log, job_env(check)), LIMIT_S)
    assert code not in (0, -9), log.read_text()[-3000:]  # -9: still running at the limit, killed
    lines = log.read_text().splitlines()
    expected = f"error: rank 0/2: Not a directory: {blocker / 'run'}"
    assert lines.count(expected) == 1  # the rank's own line, without a traceback
    assert not [ln for ln in lines if ln.startswith("[rank0]:")]
    cause = "\n".join(lines[next(i for i, ln in enumerate(lines) if "Root Cause" in ln):])
    assert "rank      : 0" in cause and f"traceback : {expected}" in cause  # torchrun's summary shows it


# The process group's timeout, which also bounds how long the two processes may take to meet at
# start-up (torch's rendezvous): long enough for a loaded machine to start the second one.
STUCK_TIMEOUT_S = 20


def _stuck_peer(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      VITPE_DIST_TIMEOUT=str(STUCK_TIMEOUT_S))
    dist.init_distributed("cpu")
    if rank == 0:  # never joins the collective: waits until rank 1 has its outcome
        end = time.time() + 10 * STUCK_TIMEOUT_S
        while not Path(out).exists() and time.time() < end:
            time.sleep(0.2)
    else:
        t0 = time.time()
        try:
            torch.distributed.all_reduce(torch.ones(1))
            outcome = "completed"
        except RuntimeError as e:
            outcome = f"{time.time() - t0:.2f} {e}"
        Path(out).write_text(outcome)
    os._exit(0)  # a group with a timed-out collective cannot be left cleanly; the test is done


def test_a_collective_whose_peer_never_arrives_fails_after_the_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "outcome.txt"
    mp.spawn(_stuck_peer, args=(port, str(out)), nprocs=2, join=True)
    seconds, message = out.read_text().split(" ", 1)
    assert 0.75 * STUCK_TIMEOUT_S <= float(seconds) < 2 * STUCK_TIMEOUT_S, message
    assert "timed out" in message.lower() or "timeout" in message.lower()


def test_the_timeout_comes_from_the_environment_with_a_few_minutes_by_default(monkeypatch):
    monkeypatch.delenv("VITPE_DIST_TIMEOUT", raising=False)
    assert dist.collective_timeout() == timedelta(seconds=dist.DEFAULT_TIMEOUT_S)
    assert 60 <= dist.DEFAULT_TIMEOUT_S <= 900
    monkeypatch.setenv("VITPE_DIST_TIMEOUT", "2.5")
    assert dist.collective_timeout() == timedelta(seconds=2.5)
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv("VITPE_DIST_TIMEOUT", bad)
        with pytest.raises(UserError, match=f"VITPE_DIST_TIMEOUT='{bad}': expected a positive number"):
            dist.collective_timeout()


def test_the_reported_line_is_what_torchrun_shows_for_the_rank(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = f"error: {dist.process_label()}no such file: x.png"
    assert line == "error: rank 1/2: no such file: x.png"
    dist.report_failure(line)
    failure = ProcessFailure(local_rank=1, pid=1234, exitcode=2, error_file=str(tmp_path / "error.json"))
    assert f"traceback : {line}" in ChildFailedError("train_cls.py", {1: failure}).format_msg()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.process_label() == ""
