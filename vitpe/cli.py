"""What every training script shares on the command line: the options, how they resolve into a
config, and how user errors end the program (one line on stderr, exit code 2, no traceback).

Resolution order, later wins: dataclass defaults <- ``--config`` YAML <- named options
(``--lr``, ``--epochs``, ...) <- ``--set key=value``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .config import ConfigError, apply_overrides, load_config, override
from .errors import CheckpointError, DataError, UserError

_logger = logging.getLogger(__name__)

C = TypeVar("C")

#: option dest -> dotted config key, for configs built on the shared sections of ``vitpe.config``.
CLI_KEYS: dict[str, str] = {
    "data": "data.path", "img_size": "data.img_size", "batch_size": "data.batch_size", "workers": "data.workers",
    "model": "model.name", "pos": "model.pos", "lr": "optim.lr", "epochs": "run.epochs", "output": "run.output",
    "device": "run.device", "seed": "run.seed", "resume": "run.resume", "eval_sizes": "eval.sizes",
}


def _positive_list(text: str, conv: Callable[[str], Any], kind: str, example: str, what: str) -> list:
    try:
        values = [conv(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind} like {example}, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive {what}, got {text!r}")
    return values


def parse_sizes(text: str) -> list[int]:
    """``"24,32,48"`` -> ``[24, 32, 48]`` (argparse type for ``--eval-sizes`` / ``--sizes``)."""
    return _positive_list(text, int, "integers", "24,32,48", "sizes")


def parse_scales(text: str) -> list[float]:
    """``"0.5,1,1.5"`` -> ``[0.5, 1.0, 1.5]`` (argparse type for ``--eval-scales``)."""
    return _positive_list(text, float, "numbers", "0.5,1.0,1.5", "scales")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too; keep it short)
        self.exit(2, f"{self.prog}: error: {message}\n")


def common_parser(description: str, eval_sizes: bool = True) -> argparse.ArgumentParser:
    """The options every training script takes; scripts may add their own. Unset options are None,
    so only what the user typed overrides the config file. Without ``eval_sizes`` the option
    ``--eval-sizes`` is left out of the help, still parsed so that the script can say what to use
    instead."""
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", metavar="FILE", help="YAML config (only what differs from the defaults)")
    a("--data", metavar="DIR", help="dataset folder, or 'synthetic'")
    a("--model", metavar="NAME", help="timm model name (vitpe's included)")
    a("--pos", metavar="STRATEGY", help="positional strategy, e.g. peg or peg+rope_mixed")
    a("--epochs", type=int, metavar="N")
    a("--batch-size", type=int, metavar="N", help="global batch size (over all processes)")
    a("--img-size", type=int, metavar="N", help="training resolution")
    a("--lr", type=float, help="peak learning rate")
    a("--output", metavar="DIR", help="output folder")
    a("--device", metavar="DEV", help="cpu, cuda, cuda:N or auto")
    a("--eval-sizes", type=parse_sizes, metavar="S1,S2,...",
      help="test resolutions evaluated after training" if eval_sizes else argparse.SUPPRESS)
    a("--resume", metavar="CHECKPOINT", help="continue from this checkpoint")
    a("--workers", type=int, metavar="N", help="data-loading processes")
    a("--seed", type=int, metavar="N")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. optim.lr=1e-3")
    return p


def resolve_config(cls: type[C], args: argparse.Namespace, keymap: Mapping[str, str] = CLI_KEYS,
                   base: C | None = None) -> C:
    """defaults (or ``base``, e.g. a resumed checkpoint's config) <- ``args.config`` <- named options
    that are not None <- ``args.set``."""
    if getattr(args, "config", None):
        cfg = load_config(args.config, cls, base)
    else:
        cfg = base if base is not None else cls()
    for dest, key in keymap.items():
        value = getattr(args, dest, None)
        if value is not None:
            try:
                cfg = override(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"--{dest.replace('_', '-')}: {e}") from None
    return apply_overrides(cfg, getattr(args, "set", None) or [])


def changed_settings(before: Any, after: Any, skip: Sequence[str] = ()) -> list[str]:
    """``key: old -> new`` for every config entry that differs between two configs of one kind."""
    from .config import to_dict

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else {f"{prefix}{k}": v})
        return out

    a, b = flat(to_dict(before)), flat(to_dict(after))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in skip]


def run_training(cls: type[C], args: argparse.Namespace, train: Callable[[C, Any, dict | None], int],
                 keymap: Mapping[str, str] = CLI_KEYS) -> int:
    """The body of every training script's ``main``: resolve the config (on ``--resume`` the
    checkpoint's own config is the base, so a resumed run keeps its recipe), join the process
    group when under torchrun, call ``train(cfg, device, resumed_state_or_None)``, leave the group."""
    from .config import from_dict
    from .engine import distributed as dist
    from .engine.checkpoint import load_checkpoint
    from .errors import CheckpointError

    cfg = resolve_config(cls, args, keymap)
    resumed = None
    if cfg.run.resume:  # from --resume, --set run.resume=... or the YAML alike
        resumed = load_checkpoint(cfg.run.resume)
        resumed["source"] = str(cfg.run.resume)  # named in restore_training_state's errors
        if not isinstance(resumed.get("config"), dict):
            raise CheckpointError(f"{cfg.run.resume}: not a vitpe training checkpoint (no 'config'); --resume "
                                  f"takes the checkpoint.pt a training run writes")
        try:
            base = from_dict(cls, resumed["config"])
        except ConfigError as e:
            raise CheckpointError(f"{cfg.run.resume}: not a checkpoint of this script's task: its config does not "
                                  f"fit ({e})") from None
        cfg = resolve_config(cls, args, keymap, base=base)
        changed = changed_settings(base, cfg, skip=("run.resume", "run.output", "run.device", "data.workers"))
        if changed:
            note = (" (the schedule's steps per epoch change with the batch; the epochs done keep their share of it)"
                    if any(c.startswith("data.batch_size") for c in changed) else "")
            _logger.info("resuming with settings other than the run's own: %s%s", "; ".join(changed), note)
        here = str(Path(cfg.run.resume).parent)
        if cfg.run.output == base.run.output and Path(here).resolve() != Path(cfg.run.output).resolve():
            # a run copied or moved (or a relative path from another folder): it goes on where its
            # checkpoint is, not in the folder it was first written to (--output chooses another)
            _logger.info("resuming in %s, the checkpoint's folder (the run was written to %s)", here,
                         cfg.run.output)
            cfg.run.output = here
    device = dist.init_distributed(cfg.run.device)
    code = train(cfg, device, resumed)
    # Not on an error: leaving the group would close its connections before run_cli has reported
    # the error, and the other processes' "connection closed" would then reach torchrun first and
    # be taken for the cause. The process exits right after reporting, which closes them anyway.
    dist.cleanup()
    return code


def run_cli(main: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit with its return code; user errors become one line and exit 2.

    Under torchrun the line names the rank and is handed to torchrun, which then ends the other
    processes and shows the line in its failure summary; an unexpected exception is recorded
    with its traceback (torch's ``record``), so the summary says which rank failed and why."""
    from .engine.distributed import process_label, report_failure

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = _recorded(main)(argv)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        msg = _user_message(e) if isinstance(e, UserError) else f"{e.strerror or e}: {e.filename}"
        line = f"error: {process_label()}{msg}".splitlines()[0]
        print(line, file=sys.stderr)
        report_failure(line)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))


def _user_message(e: UserError) -> str:
    """``e``'s message; for an error raised in a DataLoader worker, whose message torch replaces
    with "Caught DataError in DataLoader worker process N." and the worker's traceback, the
    original message (the file and what is wrong with it), taken from the traceback's last entry."""
    msg = str(e)
    if msg.startswith("Caught ") and "\nOriginal Traceback" in msg:
        mark = f"{type(e).__module__}.{type(e).__qualname__}: "
        at = msg.rfind("\n" + mark)
        if at >= 0:
            return msg[at + 1 + len(mark):]
    return msg


def _recorded(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` under torch's ``record`` when started by torchrun (elsewhere it would only
    re-register the fault handler)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return main
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(main)


__all__ = ["CLI_KEYS", "CheckpointError", "ConfigError", "DataError", "UserError", "common_parser", "parse_scales", "parse_sizes",
           "resolve_config", "run_cli", "run_training"]
