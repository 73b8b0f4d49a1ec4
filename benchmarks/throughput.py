"""Training and inference throughput of vitpe strategies against timm's equivalent models, side by side.

    python benchmarks/throughput.py --sizes small,base --strategies learned,rope_axial,rope_mixed \
        --resolutions 224,384 --modes eager,compiled --batch-size 256 --output runs/bench

For every (model size, strategy, resolution, mode) it measures, on the same input and batch:
training step (forward, backward, AdamW) and inference images/s, peak GPU memory and achieved
TFLOP/s (FLOPs from torch.utils.flop_counter), for vitpe and for timm's reference model:
``vit_{size}_patch16_224`` for ``learned`` (and for strategies timm lacks, as the plain baseline),
``vit_{size}_patch16_rope_224`` for ``rope_axial``, ``vit_{size}_patch16_rope_mixed_224`` for
``rope_mixed``. Writes ``throughput.json`` and ``throughput.md`` (with the ratio vitpe / timm, and
each strategy's ratio to vitpe's own ``learned`` when ``learned`` is measured first). Each rate is
the median of ``--repeats`` timed windows of ``--steps`` steps; the JSON keeps the windows' spread
(``train_spread``, ``infer_spread``: slowest minus fastest, over the median). A model that fails
to build, compile or run is left out with its error in its row (and its traceback on stderr);
the others are measured as before.

``--kernel-settings`` times the vitpe models again under other constants of its Triton kernel
modules, each setting recompiled from scratch (torch's compile caches off, as their keys do not
see these constants), e.g. a depthwise tile in the whole model:

    python benchmarks/throughput.py --no-reference --sizes small --modes compiled \
        --strategies learned,mixffn --kernel-settings '' 'depthwise:CONV_TILE=1024'

``learned`` (and timm's models) run no vitpe kernel but the MLP's bias and GELU, so they are
measured under the first setting only and stay every setting's baseline; rows say their setting
in the column ``kernels``. A setting of ``bias_gelu`` measures ``learned`` again, its ratio to the
first ``learned``:

    python benchmarks/throughput.py --no-reference --sizes base --modes compiled --strategies learned \
        --kernel-settings '' 'bias_gelu:IN_MLP=0'

By default each model is measured alone, one after another. A GPU's speed can drift between one
model's measurement and the next's (on an H200 the same model's ratio to ``learned`` moved by up
to 0.09 between runs), so ``--interleave`` keeps the models of each (size, resolution, mode)
resident and compiled together and times them in turns, window by window; each rate is still the
median of ``--repeats`` windows, and ``--repeats 5`` or more gives the medians something to work on:

    python benchmarks/throughput.py --no-reference --sizes small --modes compiled --interleave \
        --repeats 5 --strategies learned,mixffn,rpb

``--grad-checkpointing`` recomputes every block in the backward on both sides (timm's and vitpe's
``set_grad_checkpointing``): the time it costs and the peak memory it saves, against a run without:

    python benchmarks/throughput.py --sizes base --modes eager,compiled --strategies learned,rope_mixed \
        --grad-checkpointing --output runs/throughput_ckpt
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vitpe  # noqa: E402,F401  (registers the models)

REFERENCE = {"learned": "vit_{size}_patch16_224", "rope_axial": "vit_{size}_patch16_rope_224",
             "rope_mixed": "vit_{size}_patch16_rope_mixed_224"}


def build(name: str, res: int, depth: int | None, grad_checkpointing: bool = False, **kw: Any) -> torch.nn.Module:
    extra = {"depth": depth} if depth else {}
    model = timm.create_model(name, img_size=res, num_classes=1000, **extra, **kw)
    model.set_grad_checkpointing(grad_checkpointing)  # timm's and vitpe's: each block run again in the backward
    return model


def warm_up(step: Callable[[], Any], calls: int, device: torch.device) -> None:
    """``calls`` untimed calls of ``step``, finished."""
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step``, after ``warmup`` untimed calls."""
    warm_up(step, warmup, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def profile(step: Callable[[], Any], args: argparse.Namespace, device: torch.device, label: str, name: str) -> None:
    """Append the ``--profile`` busiest operators of 3 calls of ``step`` (device time on CUDA) to
    ``<output>/<name>_profile.txt``."""
    from torch.profiler import ProfilerActivity, profile as profiler

    cuda = device.type == "cuda"
    with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=args.profile, max_name_column_width=70)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / f"{name}_profile.txt", "a") as f:
        f.write(f"## {label} (3 steps)\n{table}\n\n")


def compile_fn(model: torch.nn.Module, args: argparse.Namespace) -> Callable[..., Any]:
    """``torch.compile`` with ``--compile-mode`` (``default``, ``reduce-overhead`` for CUDA graphs,
    ``max-autotune``...)."""
    return torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)


class Bench:
    """One model ready to time: its training step (forward, backward, AdamW) and inference step
    on one fixed batch, and the FLOPs of a training step."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, res: int, compiled: bool, label: str) -> None:
        self.args, self.label = args, label
        self.device = device = torch.device(args.device)
        self.model = model = model.to(device)
        x = torch.randn(args.batch_size, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (args.batch_size,), device=device)
        self.batch = (x, y)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused_adamw or None)
        fwd = compile_fn(model, args) if compiled else model

        def train_step() -> None:
            with amp:
                loss = torch.nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer_step() -> None:
            with torch.inference_mode(), amp:
                fwd(x)

        self.train_step, self.infer_step = train_step, infer_step
        flops = FlopCounterMode(display=False)
        # one eager forward, counted once per model, through torch's operators: the counter does not
        # see into vitpe's Triton kernels (rpb's attention, the token convolution), whose products
        # would go uncounted; torch's versions of them do the same arithmetic
        with flops, torch.no_grad(), amp, torch_operators_only():
            model(x)
        # A training step is taken as 3x the forward (backward = 2x). Counting the backward directly
        # is wrong for grouped convolutions: torch's counter charges a depthwise kernel's weight
        # gradient as if the convolution were dense (about `groups` times too much).
        self.train_flops = 3 * flops.get_total_flops()

    def warm_train(self) -> float:
        """The untimed warm-up training steps; the peak GPU memory they reach (GiB), counting only
        this model's tensors (and its batch) when others are resident (interleaved models hold their
        weights and optimizer states meanwhile; these steps are the model's first, so before them it
        holds only its weights and batch)."""
        self.model.train()
        if self.device.type != "cuda":
            warm_up(self.train_step, self.args.warmup, self.device)
            return float("nan")
        own = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers(), *self.batch))
        others = torch.cuda.memory_allocated() - own
        torch.cuda.reset_peak_memory_stats()
        warm_up(self.train_step, self.args.warmup, self.device)
        return (torch.cuda.max_memory_allocated() - others) / 2**30

    def result(self, train: tuple[float, float], infer: tuple[float, float], mem: float) -> dict[str, float]:
        """The rates from the timed windows' (median seconds per step, spread), training and inference."""
        (t_train, train_spread), (t_infer, infer_spread) = train, infer
        b = self.args.batch_size
        return dict(train_img_s=b / t_train, infer_img_s=b / t_infer, train_tflops=self.train_flops / t_train / 1e12,
                    peak_mem_gib=mem, train_spread=train_spread, infer_spread=infer_spread)


def median_spread(times: list[float]) -> tuple[float, float]:
    """The median window (of an even number, the mean of the middle two), and the spread (slowest
    minus fastest, over the median)."""
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def measure(build_model: Callable[[], torch.nn.Module], args: argparse.Namespace, res: int, compiled: bool,
            label: str = "") -> dict[str, Any]:
    """One model's rates, measured alone: its windows timed one after another (``measure_interleaved``
    with this model only)."""
    return measure_interleaved([(build_model, label)], args, res, compiled)[0]


def failure(label: str, error: Exception) -> dict[str, Any]:
    """A model's result when building, compiling or timing it raised: the error, also printed with
    its traceback. The other models of the run go on."""
    print(f"{label}: failed, left out of the comparison", file=sys.stderr, flush=True)
    traceback.print_exception(error, file=sys.stderr)
    first = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {first[0] if first else ''}"[:300]}


def measure_interleaved(jobs: list[tuple[Callable[[], torch.nn.Module], str]], args: argparse.Namespace, res: int,
                        compiled: bool) -> list[dict[str, Any]]:
    """The rates of several models, timed in turns: window ``r`` of every model before window
    ``r + 1`` of any, for training and then for inference, so that a ratio between two of them
    compares windows taken moments apart (a GPU's speed can drift by several percent between
    one model's measurement and the next's). ``jobs``: (model builder, label). A model that fails
    (``failure``) leaves the turns; the others are timed as before.

    Compiled, their code is dropped before and after: the models of a run share code (blocks,
    attention), and after 8 compiled versions of one function dynamo would run it uncompiled,
    timing the later models of a long list in eager mode; the models of one call stay compiled
    together under a recompile limit raised to fit them."""
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(jobs))
    device = torch.device(args.device)
    out: dict[int, dict[str, Any]] = {}
    live: dict[int, Bench] = {}

    def guarded(i: int, label: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with model ``i`` failed and out of the turns."""
        try:
            return fn()
        except Exception as e:
            out[i] = failure(label, e)
            live.pop(i, None)
            return None

    def in_turns(step: Callable[[Bench], Callable[[], Any]]) -> dict[int, list[float]]:
        """``--repeats`` windows of each live model's step, window ``r`` of every one before ``r + 1``."""
        times: dict[int, list[float]] = {i: [] for i in live}
        for _ in range(max(1, args.repeats)):
            for i in [i for i in times if i in live]:
                t = guarded(i, live[i].label, lambda: timed(step(live[i]), args.steps, 0, device))
                if t is not None:
                    times[i].append(t)
        return {i: t for i, t in times.items() if i in live}

    drop_compiled = torch._dynamo.reset if compiled else (lambda: None)
    drop_compiled()
    with sdpa_preference(args.sdpa), \
            torch._dynamo.config.patch(recompile_limit=limit):
        for i, (build_model, label) in enumerate(jobs):
            torch.manual_seed(0)
            bench = guarded(i, label, lambda: Bench(build_model(), args, res, compiled, label))
            if bench is not None:
                live[i] = bench
        mems = {i: guarded(i, b.label, b.warm_train) for i, b in list(live.items())}
        train = in_turns(lambda b: b.train_step)
        for i, t in train.items():  # on the log before inference compiles, in case a run is cut short
            print(f"{live[i].label}: train {args.batch_size / median_spread(t)[0]:.0f} img/s", flush=True)
        if args.profile:
            for b in live.values():
                profile(b.train_step, args, b.device, f"{b.label} train", "throughput")
        for i, b in list(live.items()):
            b.model.eval()
            guarded(i, b.label, lambda: warm_up(b.infer_step, args.warmup, b.device))
        infer = in_turns(lambda b: b.infer_step)
        for i, b in live.items():
            out[i] = b.result(median_spread(train[i]), median_spread(infer[i]), mems[i])
    drop_compiled()
    return [out[i] for i in range(len(jobs))]


def sdpa_backends() -> dict[str, Any]:
    """``scaled_dot_product_attention``'s backends by the names the benchmarks take."""
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sdpa_preference(names: list[str]) -> Any:
    """A context that makes scaled_dot_product_attention try these backends first, in this order
    (``cudnn``, ``flash``, ``efficient``, ``math``); the others stay as fallbacks. No names: torch's
    own choice, unchanged."""
    from torch.nn.attention import sdpa_kernel

    if not names:
        return nullcontext()
    table = sdpa_backends()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--sdpa: unknown backend(s) {unknown}; choose from {sorted(table)}")
    order = [table[n] for n in names] + [b for n, b in table.items() if n not in names]
    return sdpa_kernel(order, set_priority=True)


KERNEL_MODULES = ("depthwise", "attention", "rope", "bias_gelu")  # vitpe.kernels' modules with tile constants


@contextmanager
def torch_operators_only() -> Iterator[None]:
    """vitpe's Triton kernels switched off (each module's ``ENABLED``), restored afterwards."""
    import importlib

    modules = [importlib.import_module(f"vitpe.kernels.{name}") for name in KERNEL_MODULES]
    saved = [m.ENABLED for m in modules]
    try:
        for m in modules:
            m.ENABLED = False
        yield
    finally:
        for m, v in zip(modules, saved):
            m.ENABLED = v


def parse_kernel_settings(spec: str) -> list[tuple[ModuleType, str]]:
    """``"depthwise:CONV_TILE=1024,CONV_WARPS=8;attention:BLOCK_M=64"`` -> (module, constants) pairs,
    each checked by ``parse_tiles``; ``""`` is the modules' own constants."""
    import importlib

    out = []
    for part in filter(None, (t.strip() for t in spec.split(";"))):
        name, sep, consts = part.partition(":")
        if not sep or name not in KERNEL_MODULES:
            raise ValueError(f"--kernel-settings {spec!r}: {part!r} is not MODULE:NAME=V,... with MODULE one of "
                             f"{', '.join(KERNEL_MODULES)}")
        module = importlib.import_module(f"vitpe.kernels.{name}")
        parse_tiles(module, consts)
        out.append((module, consts))
    return out


@contextmanager
def kernel_settings(spec: str, uncached: bool = False) -> Iterator[None]:
    """The kernel modules' constants set as ``spec`` says, restored afterwards; compiled code is
    dropped on entry and exit, since a compiled graph keeps the constants it was traced with.

    ``uncached``: with torch's compile caches off. Their keys are taken from the graph before
    inductor traces into vitpe's ``triton_op``s, where the constants are read, so a graph compiled
    under one setting would be found again under another (a constant that does not change the
    model's Python, such as ``depthwise.CONV_STAGES``, would then seem to change nothing)."""
    from contextlib import ExitStack

    torch._dynamo.reset()
    try:
        with ExitStack() as stack:
            if uncached:
                from torch._inductor import config as inductor_config

                stack.enter_context(inductor_config.patch(force_disable_caches=True))
            for module, consts in parse_kernel_settings(spec):
                stack.enter_context(tile_settings(module, consts))
            yield
    finally:
        torch._dynamo.reset()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every combination; the files are rewritten after each row, so a run cut short keeps
    what it measured."""
    rows: list[dict[str, Any]] = []
    (args.output / "throughput_profile.txt").unlink(missing_ok=True)  # appended to by every measurement
    learned: dict[tuple, dict[str, float]] = {}  # vitpe's own `learned` per (size, res, mode): list it first
    refs: dict[tuple, dict[str, float]] = {}  # timm's models per (name, res, mode)
    uncached = args.kernel_settings != [""]  # any setting but the modules' own: no compile caches
    for i, spec in enumerate(args.kernel_settings):
        with kernel_settings(spec, uncached):
            _run_setting(args, spec or "default", i == 0, rows, learned, refs)
    return rows


def _run_setting(args: argparse.Namespace, label: str, first: bool, rows: list[dict[str, Any]],
                 learned: dict[tuple, dict[str, float]], refs: dict[tuple, dict[str, float]]) -> None:
    """Every (size, resolution, mode, strategy) under one kernel setting, appended to ``rows``;
    after the first setting, timm's models are not measured again. With ``--interleave`` the models
    of one (size, resolution, mode) are timed in turns, and ``learned`` is timed again in each
    setting's turns, so that the setting's ratios to it come from windows taken alongside (runs
    drift by more than the differences measured); without it, and for settings that leave
    ``learned`` alone, ``learned`` is measured once, under the first setting (a ``bias_gelu:``
    setting, which changes it, times it again)."""
    tag = "" if label == "default" else f" [{label}]"
    again = args.interleave or "bias_gelu:" in label
    for size in args.sizes:
        for res in args.resolutions:
            for mode in args.modes:
                strategies = [s for s in args.strategies if first or again or s != "learned"]
                ref_names = {s: reference_name(s, size) for s in strategies}
                # (kind, name) -> (builder, label), in the order they are measured
                jobs: dict[tuple[str, str], tuple[Callable[[], torch.nn.Module], str]] = {}
                for strategy in strategies:
                    ref_name = ref_names[strategy]
                    if args.reference and (ref_name, res, mode) not in refs:
                        jobs["timm", ref_name] = (lambda n=ref_name: build(n, res, args.depth,
                                                                           grad_checkpointing=args.grad_checkpointing),
                                                  f"{ref_name} {res} {mode}")
                    jobs["vitpe", strategy] = (
                        lambda s=strategy: build(f"vitpe_vit_{size}_patch16_224", res, args.depth,
                                                 grad_checkpointing=args.grad_checkpointing, pos=s),
                        f"vitpe {size} {strategy} {res} {mode}{tag}")
                compiled = mode == "compiled"
                if args.interleave:
                    measured = dict(zip(jobs, measure_interleaved(list(jobs.values()), args, res, compiled)))
                else:
                    measured = LazyMeasure(jobs, args, res, compiled)
                for strategy in strategies:
                    ref_name = ref_names[strategy]
                    if ("timm", ref_name) in jobs:
                        refs[ref_name, res, mode] = measured["timm", ref_name]
                    ours = measured["vitpe", strategy]
                    ref = refs.get((ref_name, res, mode))
                    rows.append(make_row(size, strategy, res, mode, label, ref_name, ours, ref, learned, first))
                    print(markdown(rows[-1:], header=len(rows) == 1, kernels=len(args.kernel_settings) > 1), flush=True)
                    write(args, rows)


def reference_name(strategy: str, size: str) -> str:
    """timm's model for a strategy: its RoPE ViTs for the rotary strategies, the plain ViT otherwise
    (and where timm has no RoPE ViT of that size)."""
    ref_name = REFERENCE.get(strategy, REFERENCE["learned"]).format(size=size)
    return ref_name if ref_name in timm.list_models(ref_name) else REFERENCE["learned"].format(size=size)


class LazyMeasure:
    """Each model measured alone when its result is first asked for: one after another, in the
    order the rows need them, each row written as soon as it is measured."""

    def __init__(self, jobs: dict, args: argparse.Namespace, res: int, compiled: bool) -> None:
        self.jobs, self.args, self.res, self.compiled, self.done = jobs, args, res, compiled, {}

    def __getitem__(self, key: tuple[str, str]) -> dict[str, Any]:
        if key not in self.done:
            build_model, label = self.jobs[key]
            self.done[key] = measure(build_model, self.args, self.res, self.compiled, label)
        return self.done[key]


def make_row(size: str, strategy: str, res: int, mode: str, label: str, ref_name: str, ours: dict[str, float],
             ref: dict[str, float] | None, learned: dict[tuple, dict[str, float]], first: bool = True) -> dict[str, Any]:
    """A table row: vitpe's rates, timm's, and the ratios to timm and to vitpe's own ``learned``
    (recorded here when ``strategy`` is ``learned``): this setting's ``learned`` if it was timed,
    else the first setting's; a ``learned`` row of a later setting is compared with the first's,
    which shows what the setting changes. A side that failed (``failure``) has no ratios."""
    key = (size, res, mode)
    if strategy == "learned":
        if first:
            learned[key] = ours
        learned[(*key, label)] = ours
        own = learned.get(key, ours)
    else:
        own = learned.get((*key, label), learned.get(key))
    ok = "error" not in ours
    ref_ok, own_ok = ok and ref is not None and "error" not in ref, ok and own is not None and "error" not in own
    return dict(size=size, strategy=strategy, res=res, mode=mode, kernels=label,
                reference=ref_name if ref else None, vitpe=ours, timm=ref,
                train_ratio=ours["train_img_s"] / ref["train_img_s"] if ref_ok else None,
                infer_ratio=ours["infer_img_s"] / ref["infer_img_s"] if ref_ok else None,
                train_vs_learned=ours["train_img_s"] / own["train_img_s"] if own_ok else None,
                infer_vs_learned=ours["infer_img_s"] / own["infer_img_s"] if own_ok else None)


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    write_rows(args, "throughput", rows, markdown(rows, kernels=len(args.kernel_settings) > 1), timm=timm.__version__)


def parse_tiles(module: ModuleType, spec: str) -> dict[str, int]:
    """``"CONV_TILE=1024,WG_WARPS=8"`` -> the kernel module's integer constants to set; each must exist."""
    settings = {}
    for item in filter(None, (t.strip() for t in spec.split(","))):
        name, _, value = item.partition("=")
        known = sorted(k for k, v in vars(module).items() if k.isupper() and type(v) is int)
        if name not in known or not value.lstrip("-").isdigit():
            raise ValueError(f"--tiles {spec!r}: {item!r} is not NAME=INTEGER for a tile constant of "
                             f"{module.__name__} ({', '.join(known)})")
        settings[name] = int(value)
    return settings


@contextmanager
def tile_settings(module: ModuleType, spec: str) -> Iterator[None]:
    """A kernel module's tile constants set as ``spec`` says (``parse_tiles``), restored afterwards."""
    settings = parse_tiles(module, spec)
    saved = {k: getattr(module, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def write_rows(args: argparse.Namespace, name: str, rows: list[dict[str, Any]], table: str,
               **versions: str) -> None:
    """``<name>.json`` (the arguments, the device, torch's and ``versions``, the rows) and
    ``<name>.md`` (``table``) in ``args.output``."""
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = dict(args={k: str(v) for k, v in vars(args).items()}, device=device, torch=torch.__version__,
                **versions, rows=rows)
    (args.output / f"{name}.json").write_text(json.dumps(meta, indent=1))
    (args.output / f"{name}.md").write_text(table + "\n")


def markdown(rows: list[dict[str, Any]], header: bool = True, kernels: bool = False) -> str:
    """The table; with ``kernels``, a last column naming each row's kernel setting."""
    lines = []
    if header:
        lines += ["| model | strategy | res | mode | reference | train img/s | timm train | train ratio | "
                  "infer img/s | timm infer | infer ratio | train / learned | infer / learned | TFLOP/s | peak GiB |"
                  + (" kernels |" if kernels else ""),
                  "|" + "---|" * (16 if kernels else 15)]
    for r in rows:
        v, t = r["vitpe"], r["timm"] or {}
        if "error" in v:
            lines.append(f"| {r['size']} | {r['strategy']} | {r['res']} | {r['mode']} | {r['reference'] or '-'} | "
                         f"failed: {v['error'].replace('|', '/')} |" + " - |" * 9 + (f" {r['kernels']} |" if kernels else ""))
            continue
        lines.append(f"| {r['size']} | {r['strategy']} | {r['res']} | {r['mode']} | {r['reference'] or '-'} | "
                     f"{v['train_img_s']:.0f} | {_num(t.get('train_img_s'))} | {_ratio(r['train_ratio'])} | "
                     f"{v['infer_img_s']:.0f} | {_num(t.get('infer_img_s'))} | {_ratio(r['infer_ratio'])} | "
                     f"{_ratio(r.get('train_vs_learned'))} | {_ratio(r.get('infer_vs_learned'))} | "
                     f"{v['train_tflops']:.1f} | {v['peak_mem_gib']:.1f} |" + (f" {r['kernels']} |" if kernels else ""))
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--sizes", type=csv, default=["small", "base"], help="tiny, small, base")
    p.add_argument("--strategies", type=csv, default=["learned", "rope_axial", "rope_mixed", "peg", "rpb"])
    p.add_argument("--resolutions", type=lambda s: [int(v) for v in csv(s)], default=[224])
    p.add_argument("--modes", type=csv, default=["eager", "compiled"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed windows of --steps steps per measurement; "
                   "the median is reported, and the spread between windows in the JSON")
    p.add_argument("--depth", type=int, default=None, help="override the block count (quick checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--sdpa", type=csv, default=[], help="attention backends to try first, in order, for both "
                   "models: cudnn, flash, efficient, math (default: torch's own choice)")
    p.add_argument("--grad-checkpointing", action="store_true", help="both sides' blocks recomputed in the backward "
                   "(set_grad_checkpointing): its cost in time, and the peak memory it saves")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW as one fused kernel (as vitpe's training "
                   "scripts run it) for both models, instead of torch's default multi-tensor AdamW")
    p.add_argument("--interleave", action="store_true",
                   help="time the models of each (size, resolution, mode) in turns, window by window, all of them "
                   "resident and compiled together, so that ratios compare windows taken moments apart "
                   "(default: each model measured alone, one after another)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip timm's models (only the ratios to vitpe's own learned)")
    p.add_argument("--kernel-settings", nargs="*", default=[""], metavar="MODULE:NAME=V,...",
                   help="settings of vitpe's kernel constants to time the models under, one after another, "
                   "each 'MODULE:NAME=V,...' with ';' between modules (depthwise, attention, rope, bias_gelu); '' is the "
                   "modules' own (the default)")
    add_common(p)
    p.add_argument("--output", type=Path, default=Path("runs/throughput"))
    args = p.parse_args(argv)
    for spec in args.kernel_settings:
        try:
            parse_kernel_settings(spec)
        except ValueError as e:
            p.error(str(e))
    return args


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared with hf_compare.py."""
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for the compiled models: default, reduce-overhead (CUDA graphs), "
                   "max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="write the N busiest operators of every training measurement to <output>/*_profile.txt")
    p.add_argument("--inductor", type=parse_inductor, default={}, metavar="KEY=V,...",
                   help="torch._inductor.config settings for the compiled models, e.g. "
                   "'coordinate_descent_tuning=True,triton.tile_reductions=True'")


def parse_inductor(spec: str) -> dict[str, Any]:
    """``"coordinate_descent_tuning=True,triton.max_tiles=3"`` -> inductor config settings, each key
    checked against ``torch._inductor.config`` and each value a Python literal of the key's type."""
    from torch._inductor import config

    known = config.get_config_copy()
    settings = {}
    for item in filter(None, (t.strip() for t in spec.split(","))):
        key, _, text = item.partition("=")
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            raise argparse.ArgumentTypeError(f"{item!r}: torch._inductor.config has no {key!r}"
                                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{item!r}: the value {text!r} is not a Python literal") from None
        if known[key] is not None and type(value) is not type(known[key]):
            raise argparse.ArgumentTypeError(f"{item!r}: {key} takes a {type(known[key]).__name__}, "
                                             f"not {type(value).__name__}")
        settings[key] = value
    return settings


def inductor_settings(args: argparse.Namespace) -> Any:
    """``--inductor``'s settings, in force while the models compile."""
    from torch._inductor import config

    return config.patch(args.inductor)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    with inductor_settings(args):
        run(args)


if __name__ == "__main__":
    main()
