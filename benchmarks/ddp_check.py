"""Data-parallel checks in one go: 1 process against N at the same global batch and seed, scaling,
resume under torchrun, and how fast a job ends when one of its processes dies.

    # GPU machine with 2 GPUs (NCCL; NVLink multicast stays off), about 6 minutes:
    PYTHONPATH=. python benchmarks/ddp_check.py --out $OUT
    # the same steps on CPU with gloo and tiny settings, a few minutes:
    PYTHONPATH=. python benchmarks/ddp_check.py --profile tiny --out runs/ddp_check

Steps (``--only`` picks some):
  cls      train_cls.py on the synthetic task, 1 process and N (torchrun): final val top-1 of both
  det      train_det.py on BCCD (``--det-data``), 1 process and N: losses and COCO AP of both
  scaling  benchmarks/ddp_scaling.py on 1 and N processes (ViT-S/16, 224, bf16): images/s and ratio
           (eager; also compiled with ``--compile``)
  kill     the N-process cls run again; rank 1 is SIGKILLed (as by the OOM killer) after epoch
           ``--kill-after``; the time until the whole job has exited, and what torchrun said
  resume   the killed run resumed with --resume under torchrun; its metrics.jsonl against the
           uninterrupted N-process run of ``cls`` (needs cls and kill)
  usererr  an error on rank 0 only (its output folder cannot be made): the time until every
           process has ended, and the one-line messages
Writes summary.md, summary.json, scaling_{eager,compiled}.json and logs.tar.gz (every log, metrics.jsonl and
results.json; no checkpoints) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("cls", "det", "scaling", "kill", "resume", "usererr")
# Per profile: the arguments of each script (same global batch and seed for 1 and N processes).
PROFILES: dict[str, dict[str, list[str]]] = {
    "gpu": {
        "cls": ["--config", "configs/cls/synthetic.yaml", "--epochs", "20", "--device", "cuda", "--seed", "0",
                "--workers", "4", "--set", "eval.sizes=[]"],
        "det": ["--config", "configs/det/bccd.yaml", "--epochs", "30", "--device", "cuda", "--seed", "0",
                "--set", "eval.interval=10", "--set", "eval.sizes=[]"],
        "scaling": ["--device", "cuda"],
    },
    "tiny": {
        "cls": ["--epochs", "3", "--device", "cpu", "--seed", "0", "--workers", "0", "--batch-size", "32",
                "--set", "data.synthetic_train=128", "--set", "data.synthetic_val=64", "--set", "eval.sizes=[]",
                "--set", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"],
        "det": ["--config", "configs/det/bccd.yaml", "--epochs", "2", "--device", "cpu", "--seed", "0",
                "--workers", "0", "--min-size", "64", "--max-size", "86", "--batch-size", "16",
                "--set", "model.dim=32", "--set", "model.num_heads=4", "--set", "model.enc_layers=1",
                "--set", "model.dec_layers=1", "--set", "model.ffn_dim=64", "--set", "eval.interval=1",
                "--set", "eval.sizes=[]", "--set", "eval.figure_images=1"],
        "scaling": ["--device", "cpu", "--no-amp", "--model", "vitpe_vit_tiny_patch4_32", "--img-size", "32",
                    "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "8", "--steps", "3",
                    "--warmup", "1"],
    },
}


# -- launching and watching jobs -------------------------------------------------------------------
def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared machines
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def command(nproc: int, script: str, args: list[str]) -> list[str]:
    """``python script`` for one process, ``torchrun --nproc_per_node=N script`` for more."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, str(ROOT / script), *args]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """The job in its own process group (so that a time-out can end all of it), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """The job's exit code; past ``timeout`` its whole process group is killed (code -9)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def run_job(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    t0 = time.time()
    code = finish(start(cmd, log, env), timeout)
    return {"exit_code": code, "wall_s": round(time.time() - t0, 1), "log": log.name}


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> bool:
    """True once a line of ``log`` matches ``pattern``; False if the job ended or time ran out first."""
    rx, end = re.compile(pattern, re.M), time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if rx.search(log.read_text(errors="replace")):
            return True
        time.sleep(0.1)
    return False


def worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun ``launcher`` started (Linux: read from /proc)."""
    found: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = dict(kv.split("=", 1) for kv in proc.joinpath("environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):  # it ended meanwhile, or is not ours to read
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def kill_rank(proc: subprocess.Popen, rank: int, timeout: float) -> dict[str, Any]:
    """SIGKILL ``rank`` of torchrun job ``proc``; how long the whole job then takes to exit."""
    pid = worker_pids(proc.pid).get(rank)
    if pid is None:
        return {"error": f"rank {rank} not found among the children of {proc.pid}"}
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    code = finish(proc, timeout)
    return {"exit_code": code, "exit_after_kill_s": round(time.time() - t0, 2), "killed_pid": pid,
            "hung": code == -9 and time.time() - t0 >= timeout}


def failure_lines(log: Path) -> list[str]:
    """What a reader of the log learns about the failure: error lines and torchrun's summary."""
    keep = re.compile(r"^(error: |.*(Root Cause|rank\s+:|exitcode\s+:|traceback\s+:|Signal \d+))")
    return [ln.strip() for ln in log.read_text(errors="replace").splitlines() if keep.match(ln.strip())]


# -- reading results -------------------------------------------------------------------------------
def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def results(run: Path) -> dict[str, Any]:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def max_diff(a: list[dict[str, Any]], b: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Largest absolute difference per key over epochs (None if the epoch lists differ)."""
    if [r["epoch"] for r in a] != [r["epoch"] for r in b]:
        return {k: None for k in keys}
    return {k: max((abs(x[k] - y[k]) for x, y in zip(a, b) if k in x and k in y), default=0.0) for k in keys}


# -- the steps -------------------------------------------------------------------------------------
class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.work, self.prof = args, args.work, PROFILES[args.profile]
        self.env = child_env(1 if args.profile == "tiny" else None)
        self.summary: dict[str, Any] = {"profile": args.profile, "nproc": args.nproc}

    def train_pair(self, script: str, args: list[str], name: str, timeout: float) -> dict[str, Any]:
        """The same run on 1 process and on N; each one's exit, time, metrics and results."""
        out = {}
        for n in (1, self.args.nproc):
            run = self.work / f"{name}_{n}"
            job = run_job(command(n, script, [*args, "--output", str(run)]), self.work / f"{name}_{n}.log",
                          self.env, timeout)
            out[str(n)] = {**job, "metrics": metrics(run), "results": results(run)}
        return out

    def cls(self) -> dict[str, Any]:
        pair = self.train_pair("train_cls.py", self.prof["cls"], "cls", self.args.job_timeout)
        for r in pair.values():
            r["final_top1"] = r["results"].get("top1")
        return pair

    def det(self) -> dict[str, Any]:
        args = [*self.prof["det"], "--data", str(self.args.det_data)]
        pair = self.train_pair("train_det.py", args, "det", self.args.job_timeout)
        for r in pair.values():
            r["final"] = {k: r["results"].get("coco", {}).get(k) for k in ("AP", "AP50", "AP75")}
            r["last_loss"] = r["metrics"][-1]["loss"] if r["metrics"] else None
        return pair

    def scaling(self) -> dict[str, Any]:
        """ddp_scaling.py's driver on 1 and N processes, eager (and compiled with ``--compile``)."""
        found = {}
        for mode in ("eager", "compiled") if self.args.compile else ("eager",):
            out = self.work / f"scaling_{mode}.json"
            cmd = [sys.executable, str(ROOT / "benchmarks/ddp_scaling.py"), "--driver", f"1,{self.args.nproc}",
                   *self.prof["scaling"], *(["--compile"] if mode == "compiled" else []), "--output", str(out)]
            job = run_job(cmd, self.work / f"scaling_{mode}.log", self.env, self.args.job_timeout)
            data = json.loads(out.read_text()) if out.is_file() else {}
            runs = data.get("runs", {})
            if "1" in runs and str(self.args.nproc) in runs:
                job["ratio"] = runs[str(self.args.nproc)]["img_s"] / runs["1"]["img_s"]
                job["table"] = out.with_suffix(".md").read_text().strip()
            found[mode] = {**job, **data}
        return found

    def kill(self) -> dict[str, Any]:
        """The N-process cls run, rank 1 killed once epoch ``--kill-after`` is logged."""
        run, log = self.work / "resumed", self.work / "kill.log"
        proc = start(command(self.args.nproc, "train_cls.py", [*self.prof["cls"], "--output", str(run)]), log,
                     self.env)
        if not wait_for(log, rf"epoch\s+{self.args.kill_after}/", proc, self.args.job_timeout):
            finish(proc, 1)
            return {"error": f"epoch {self.args.kill_after} was never logged (see kill.log)"}
        got = kill_rank(proc, 1, self.args.hang_timeout)
        return {**got, "epochs_logged": [r["epoch"] for r in metrics(run)], "messages": failure_lines(log)}

    def resume(self) -> dict[str, Any]:
        run = self.work / "resumed"
        job = run_job(command(self.args.nproc, "train_cls.py", ["--resume", str(run / "checkpoint.pt")]),
                      self.work / "resume.log", self.env, self.args.job_timeout)  # the checkpoint's own config
        ref = metrics(self.work / f"cls_{self.args.nproc}")
        got = metrics(run)
        return {**job, "epochs": [r["epoch"] for r in got], "reference_epochs": [r["epoch"] for r in ref],
                "max_abs_diff": max_diff(got, ref, ("train_loss", "val_top1", "val_loss")),
                "exact": bool(ref) and [(r["train_loss"], r["val_top1"]) for r in got] ==
                [(r["train_loss"], r["val_top1"]) for r in ref]}

    def usererr(self) -> dict[str, Any]:
        """Rank 0 alone creates the output folder: under a file, it fails there, the others later."""
        blocker = self.work / "not_a_folder"
        blocker.write_text("")
        log = self.work / "usererr.log"
        job = run_job(command(self.args.nproc, "train_cls.py", [*self.prof["cls"], "--output", str(blocker / "run")]),
                      log, self.env, self.args.hang_timeout)
        return {**job, "messages": failure_lines(log)}


# -- the report ------------------------------------------------------------------------------------
def pair_rows(title: str, pair: dict[str, Any], cols: dict[str, Callable[[dict[str, Any]], Any]]) -> list[str]:
    rows = [f"### {title}", "", "| processes | exit | wall s | " + " | ".join(cols) + " |",
            "|---" * (3 + len(cols)) + "|"]
    for n, r in pair.items():
        cells = [n, r["exit_code"], r["wall_s"], *(f(r) for f in cols.values())]
        rows.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return rows + [""]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(s: dict[str, Any]) -> str:
    lines = [f"# Data-parallel check ({s['profile']} profile, {s['nproc']} processes)", ""]
    last = lambda r, k: r["metrics"][-1].get(k) if r["metrics"] else None  # noqa: E731
    epoch_s = lambda r: sum(m["time"] for m in r["metrics"]) / max(len(r["metrics"]), 1)  # noqa: E731
    if "cls" in s:
        lines += pair_rows("Classification (same global batch and seed)", s["cls"], {
            "epoch s": epoch_s, "final val top-1": lambda r: r["final_top1"],
            "last train loss": lambda r: last(r, "train_loss"),
            "val top-1 per epoch": lambda r: [round(m["val_top1"], 2) for m in r["metrics"]]})
    if "det" in s:
        lines += pair_rows("Detection (same global batch and seed)", s["det"], {
            "epoch s": epoch_s, "AP": lambda r: r["final"]["AP"], "AP50": lambda r: r["final"]["AP50"],
            "loss per epoch": lambda r: [round(m["loss"], 3) for m in r["metrics"]]})
    for mode, r in s.get("scaling", {}).items():
        lines += [f"### Scaling ({mode})", "", r.get("table", f"no result: see {r['log']}"), ""]
    for key in ("kill", "resume", "usererr", "errors"):
        if key in s:
            lines += [f"### {key}", "", "```", json.dumps(s[key], indent=1), "```", ""]
    return "\n".join(lines)


def pack(work: Path, out: Path) -> None:
    """Logs, metrics and results (no checkpoints) into one archive."""
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".jsonl", ".json", ".md", ".yaml"):
                tar.add(path, arcname=str(path.relative_to(work)))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel runs")
    p.add_argument("--only", type=lambda t: t.split(","), default=list(STEPS), help=",".join(STEPS))
    p.add_argument("--det-data", type=Path, default=ROOT / ".carry/bccd")
    p.add_argument("--compile", action="store_true", help="also measure the scaling compiled")
    p.add_argument("--kill-after", type=int, default=2, help="epoch after which rank 1 is killed")
    p.add_argument("--job-timeout", type=float, default=150, help="seconds a training job may take")
    p.add_argument("--hang-timeout", type=float, default=60, help="seconds a failed job may take to end")
    p.add_argument("--budget", type=float, help="seconds after which the remaining steps are skipped")
    p.add_argument("--work", type=Path, help="run folders and logs (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/ddp_check")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="ddp_check_"))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    begin = time.time()
    for step in (s for s in STEPS if s in args.only):
        t0 = time.time()
        if args.budget and t0 - begin > args.budget:  # leave time to write what was measured
            check.summary.setdefault("errors", {})[step] = f"skipped: {args.budget:.0f} s budget spent"
            continue
        try:
            check.summary[step] = getattr(check, step)()
        except Exception as e:  # one broken step must not hide the others' results
            check.summary.setdefault("errors", {})[step] = f"{type(e).__name__}: {e}"
        print(f"{step}: done in {time.time() - t0:.0f}s", flush=True)
        (args.out / "summary.json").write_text(json.dumps(check.summary, indent=1))
    table = markdown(check.summary)
    (args.out / "summary.md").write_text(table + "\n")
    for path in args.work.glob("scaling_*.json"):
        (args.out / path.name).write_text(path.read_text())
    pack(args.work, args.out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
