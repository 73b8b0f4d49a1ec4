"""Registers, spills, shared memory and loop instructions of the depthwise kernels, compiled for a GPU without one.

    python benchmarks/depthwise_resources.py --output runs/resources                   # sm_90, ViT-S's shape
    python benchmarks/depthwise_resources.py --tiles '' 'BWD_MERGED=0,SAVE_GELU_GRAD=0' --output runs/resources
    python benchmarks/depthwise_resources.py --calls gelu_forward --tiles 'SAVE_GELU_GRAD=0' 'SAVE_GELU_GRAD=0,ERF_POLY=0'

A kernel's registers per thread decide how many of its programs a multiprocessor holds, and a
kernel past 255 spills to local memory; both can be read off the compiled binary, so tile settings
can be checked on a machine with no GPU before one is lent. For each tile setting (``--tiles``, as
``depthwise_kernels.py`` takes them) and shape, the module's own host code is run on tensors
without data (the ``meta`` device), with each kernel launch recorded instead of made: exactly
the kernels, argument types and constants the module would launch for that shape and setting.
Each is compiled by Triton for ``--arch`` (``90``: H100 and H200) with the specialisation
Triton's JIT makes at a launch (pointers and integers divisible by 16, integers equal to 1), and
its registers and spills (``cuobjdump -res-usage``, shipped with Triton) and shared memory
(Triton's own count) are written to ``depthwise_resources.json`` and ``.md``.

The kernels that walk down the grid are bound by the instructions they issue (docs/performance.md,
sixth and eighteenth rounds), so each row also counts the machine instructions of the kernel's
longest loop (``nvdisasm``, shipped with Triton: the span from a label to the furthest branch back
to it) and, for the tiled kernels, divides them by the elements of a tile a thread holds
(``BLOCK_W x BLOCK_C`` over the threads): for the convolution kernels, instructions an output row
element. The JSON keeps the loop's instruction mix.

The calls (``--calls``) are Mix-FFN's: the convolution's ``forward`` and ``backward`` (GELU
outside, fc1's bias gradient asked for), and ``gelu_forward`` and ``gelu_backward`` (the GELU in
the kernels; with ``SAVE_GELU_GRAD`` its derivative kept from the forward). What differs from a
GPU run: programs are counted for 4 multiprocessors, which changes launch grids, not the
compiled kernels; and the Triton installed here compiles, which may be another release than the
GPU machine's (the JSON says which).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import failure, parse_tiles, tile_settings, write_rows  # noqa: E402

from vitpe.kernels import depthwise  # noqa: E402

SHAPES = [(256, 14, 14, 1536, 1)]
CALLS = ("forward", "backward", "gelu_forward", "gelu_backward")
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}


class _Launch:
    """What a launch would have been: the kernel, its launch grid, arguments and options."""

    def __init__(self, kernel: Any, grid: tuple, args: tuple, kwargs: dict[str, Any]) -> None:
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs


@contextmanager
def recorded_launches() -> Iterator[list[_Launch]]:
    """Within it, the depthwise module's kernel launches are appended to the list it yields
    instead of being made (the module calls ``traceable(kernel)[grid](*args, **kwargs)``)."""
    launches: list[_Launch] = []

    def traceable(kernel: Any) -> Any:
        class Grid:
            def __getitem__(self, grid: tuple) -> Any:
                return lambda *args, **kwargs: launches.append(_Launch(kernel, grid, args, kwargs))
        return Grid()

    saved = depthwise.traceable
    depthwise.traceable = traceable
    try:
        yield launches
    finally:
        depthwise.traceable = saved


def calls_of(shape: tuple[int, ...], call: str, dtype: torch.dtype) -> list[_Launch]:
    """The launches of one of Mix-FFN's calls (``CALLS``) on ``shape`` (B, H, W, C, P)."""
    B, H, W, C, P = shape
    x = torch.empty(B, P + H * W, C, device="meta", dtype=dtype)
    weight = torch.empty(C, 1, 3, 3, device="meta")
    bias = torch.empty(C, device="meta")
    gelu = call.startswith("gelu")
    save = gelu and bool(depthwise.SAVE_GELU_GRAD)
    with recorded_launches() as launches:
        if call.endswith("forward"):
            depthwise.conv_tokens(x, weight, bias, H, W, P, False, gelu, None, save)
        else:
            gelu_grad = torch.empty_like(x) if save else None
            depthwise.conv_tokens_backward(torch.empty_like(x), x, weight, bias, gelu_grad, H, W, P, False, gelu, True)
    return launches


def signature(launch: _Launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
    """Triton's signature, constants and argument attributes for ``launch``, as its JIT would
    specialise them: pointers (16-byte aligned, as torch allocates) and integers divisible by
    16 marked so, integers equal to 1 made constants."""
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    positional = iter(launch.args)
    for i, param in enumerate(launch.kernel.params):
        if param.is_constexpr:
            sig[param.name], consts[param.name] = "constexpr", launch.kwargs[param.name]
            continue
        value = next(positional)
        if isinstance(value, torch.Tensor):
            sig[param.name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{launch.kernel.fn.__name__}: argument {param.name} is a {type(value).__name__}; "
                            "only tensors and integers are handled")
        elif value == 1:
            sig[param.name], consts[param.name] = "constexpr", 1
        else:
            sig[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`?\(?\.?(L_x_\d+)")


def loop_instructions(sass: str) -> tuple[int, dict[str, int]]:
    """The instructions of the longest loop in ``nvdisasm -c``'s listing of one kernel, and their
    mix by opcode: the span from a label to the furthest branch back to it (a loop's body and its
    back edge; nested loops are inside it). ``(0, {})`` for a kernel without a loop (the branch to
    itself that ends every kernel's listing is none)."""
    label_at: dict[str, int] = {}
    pending: list[str] = []
    code: list[tuple[int, str, str]] = []  # (address, opcode, line)
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTRUCTION.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                label_at[name] = addr
            pending = []
            code.append((addr, m.group(2), line))
    best: tuple[int, int] | None = None
    for addr, _, line in code:
        m = _BRANCH.search(line)
        if m and m.group(1) in label_at and label_at[m.group(1)] < addr:  # not the trailing self-branch
            span = (label_at[m.group(1)], addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return 0, {}
    mix: dict[str, int] = {}
    for addr, op, _ in code:
        if best[0] <= addr <= best[1]:
            mix[op] = mix.get(op, 0) + 1
    return sum(mix.values()), dict(sorted(mix.items(), key=lambda kv: -kv[1]))


def resources(launch: _Launch, arch: int) -> dict[str, Any]:
    """Compile ``launch``'s kernel for ``sm_<arch>``: registers a thread, spilled bytes (the
    stack frame), shared memory in bytes, and the instructions of its longest loop
    (``loop_instructions``), also per element of a thread's tile where the kernel has
    ``BLOCK_W`` and ``BLOCK_C``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = signature(launch)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    src = ASTSource(launch.kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout if (tools / "nvdisasm").exists() else ""
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
    if "REG" not in found:
        raise RuntimeError(f"no register count in cuobjdump's output: {usage[:300]!r}")
    warps = options.get("num_warps", 4)
    out = dict(registers=int(found["REG"]), spill_bytes=int(found.get("STACK", 0)),
               shared_bytes=int(compiled.metadata.shared), warps=warps)
    if sass:
        n, mix = loop_instructions(sass)
        per_thread = consts.get("BLOCK_W", 0) * consts.get("BLOCK_C", 0) / (32 * warps)
        out.update(loop_instructions=n, loop_mix=mix,
                   loop_per_element=round(n / per_thread, 2) if n and per_thread >= 1 else None)
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every tile setting, shape and call; a kernel launched twice the same way is compiled once.
    The files are rewritten after each setting, so a run cut short keeps what it compiled."""
    import triton

    rows: list[dict[str, Any]] = []
    for spec in args.tiles:
        with tile_settings(depthwise, spec):
            for shape in args.shapes:
                seen: set[str] = set()
                for call in args.calls:
                    for launch in calls_of(shape, call, args.dtype):
                        consts = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
                        key = f"{launch.kernel.fn.__name__} {sorted(consts.items())} {launch.kwargs.get('num_warps')}"
                        if key in seen:
                            continue
                        seen.add(key)
                        row = dict(tiles=spec or "default", shape=list(shape), call=call,
                                   kernel=launch.kernel.fn.__name__,
                                   constants=",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                                      for k, v in consts.items()),
                                   grid=list(launch.grid))
                        try:
                            row.update(resources(launch, args.arch))
                        except Exception as e:  # a setting that does not compile: its row says why
                            row.update(failure(f"{row['kernel']} {spec}", e))
                        rows.append(row)
                        print(markdown(rows[-1:], header=len(rows) == 1), flush=True)
            write_rows(args, "depthwise_resources", rows, markdown(rows), triton=triton.__version__,
                       target=f"sm_{args.arch}")
    return rows


def markdown(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = ["| tiles | B,H,W,C,P | call | kernel | constants | warps | registers | spilled bytes | shared bytes "
             "| loop instructions | an element |",
             "|---|---|---|---|---|---|---|---|---|---|---|"] if header else []
    for r in rows:
        shape = ",".join(map(str, r["shape"]))
        if "error" in r:
            cells = f"- | failed: {r['error'].replace('|', '/')} | - | - | - | -"
        else:
            per = r.get("loop_per_element")
            cells = (f"{r['warps']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{r.get('loop_instructions', '-') or '-'} | {'-' if per is None else per}")
        lines.append(f"| {r['tiles']} | {shape} | {r['call']} | {r['kernel']} | {r['constants']} | {cells} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split(",")) for t in s.split(";")],
                   default=SHAPES, metavar="B,H,W,C,P;...", help="default: ViT-S/16's Mix-FFN at 224 px, batch 256")
    p.add_argument("--calls", type=lambda s: s.split(","), default=list(CALLS), metavar="CALL,...",
                   help=f"some of {','.join(CALLS)} (default: all)")
    p.add_argument("--tiles", nargs="*", default=[""], metavar="NAME=V,...",
                   help="tile settings, each a comma-separated list of vitpe.kernels.depthwise's constants; "
                   "'' is the module's own (the default)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the tokens' dtype")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 90 (H100, H200)")
    p.add_argument("--output", type=Path, default=Path("runs/depthwise_resources"))
    args = p.parse_args(argv)
    for spec in args.tiles:
        try:
            parse_tiles(depthwise, spec)
        except ValueError as e:
            p.error(str(e))
    bad = [c for c in args.calls if c not in CALLS]
    if bad:
        p.error(f"--calls: {bad[0]!r} is not one of {', '.join(CALLS)}")
    bad_shapes = [s for s in args.shapes if len(s) != 5]
    if bad_shapes:
        p.error(f"a shape is B,H,W,C,P; got {bad_shapes[0]}")
    args.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    args.device = "cpu"  # what write_rows records: the kernels are compiled here, not run
    return args


if __name__ == "__main__":
    run(parse())
