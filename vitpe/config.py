"""Typed configs: dataclasses, loaded from YAML and overridden with ``--set key=value``.

Every value is checked against its field's type when it comes in, so a typo or a wrong type fails
at start-up with the file, the key and the closest valid keys, not hours later. The sections shared
by every training script (``data``, ``model``, ``optim``, ``run``, ``eval``) live here; each task
extends them (dataclass inheritance) with what only it needs.

    cfg = load_config("configs/cls/cifar10.yaml", ClsConfig)
    cfg = apply_overrides(cfg, ["optim.lr=1e-3", "model.kwargs.depth=2"])
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from .errors import UserError

C = TypeVar("C")


class ConfigError(UserError):
    """A config that does not fit its dataclass: unknown key, wrong type, unreadable file."""


# -- shared sections -----------------------------------------------------------------------------
@dataclass
class DataConfig:
    path: str = "synthetic"  # dataset folder, or "synthetic" for the built-in generated data (no files needed)
    img_size: int = 32  # training resolution (pixels, square); evaluation sizes may differ
    batch_size: int = 64  # global batch: split evenly over processes under torchrun, so results don't depend on it
    workers: int = 2  # DataLoader worker processes; 0 decodes in the main process (simplest to debug)


@dataclass
class ModelConfig:
    name: str = "vitpe_vit_tiny_patch4_32"  # any timm model name; vitpe's models take `pos`
    pos: str = "sincos2d"  # positional strategy (vitpe.pos.names(), or combinations like "peg+rope_mixed")
    pos_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-strategy options, e.g. {peg: {after: [0]}}
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (depth, drop_path_rate)
    grad_checkpointing: bool = False  # recompute each block in the backward: less memory for one more forward a step

    def __post_init__(self) -> None:
        self.pos = plus_joined(self.pos)  # recorded as the models name it: 'peg + rope_mixed' -> 'peg+rope_mixed'


@contextlib.contextmanager
def model_build_errors(cfg: ModelConfig, unknown_hint: Callable[[], str]) -> Iterator[None]:
    """Errors of building ``cfg``'s model as one-line user errors: an unknown name (with
    ``unknown_hint()`` after it), arguments the model refuses, and a failure the ``kwargs`` caused."""
    try:
        yield
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown model {cfg.name!r}{unknown_hint()}") from None
        if cfg.kwargs:  # e.g. a tensor of a size the model.kwargs make impossible
            raise UserError(f"model {cfg.name!r} with kwargs={cfg.kwargs}: {e}") from None
        raise
    except (KeyError, TypeError, ValueError, AssertionError, ZeroDivisionError) as e:  # arguments it refuses
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise UserError(f"model {cfg.name!r} with pos={cfg.pos!r}, kwargs={cfg.kwargs}: {msg}") from None


def plus_joined(spec: str | None) -> str | None:
    """A strategy spec without spaces around its names (the names are checked when the model is built)."""
    return spec if not isinstance(spec, str) else "+".join(p.strip() for p in spec.split("+"))


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate for the global batch, reached after warm-up
    lr_base_batch: int | None = None  # set: lr is for this global batch, scaled linearly to data.batch_size
    # (DeiT: lr 5e-4 for a batch of 512, so 2.5e-4 at 256); every group's rate is scaled alike
    weight_decay: float = 0.05  # AdamW decay; never applied to norms, biases or position tables
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moments, as in DeiT
    warmup_epochs: float = 1.0  # linear warm-up keeps early attention from collapsing (may be fractional)
    warmup_lr_ratio: float = 0.01  # warm-up starts at lr * this ratio
    schedule: Literal["cosine", "poly", "constant", "step"] = "cosine"  # cosine: classification, poly: segmentation, step: DETR
    min_lr_ratio: float = 0.01  # the schedule ends at lr * this ratio
    poly_power: float = 1.0  # exponent of the polynomial schedule (SegFormer uses 1.0)
    step_at: list[float] = field(default_factory=lambda: [2 / 3])  # step schedule: fractions of training where lr drops
    step_gamma: float = 0.1  # step schedule: factor applied at each drop (DETR: x0.1 after 200 of 300 epochs)
    clip_grad: float | None = 1.0  # max global gradient norm; None disables clipping


@dataclass
class RunConfig:
    epochs: int = 10  # passes over the training set
    output: str = "runs/default"  # folder for config.yaml, checkpoints, metrics.jsonl, results and plots
    device: str = "auto"  # "cpu", "cuda", "cuda:1" or "auto" (cuda when available)
    seed: int = 0  # seeds every RNG; with the same seed a run repeats exactly
    resume: str | None = None  # checkpoint to continue from (model, optimizer, schedule, EMA, epoch, RNG)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU, where it is slower)
    compile: bool = False  # torch.compile the model on GPU (slower start, faster steps)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # reduce-overhead replays each step as CUDA graphs: for small batches, where launching kernels is the limit
    compile_ddp: Literal["one_graph", "buckets"] = "one_graph"  # compiled under DDP: one graph, all-reducing
    # after the backward, or one graph per gradient bucket (torch's DDPOptimizer; overlaps the all-reduces)
    log_interval: int = 50  # steps between reads of the loss on the host (progress bar, non-finite check)

    def __post_init__(self) -> None:
        if self.device != "auto":
            import torch
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"key 'run.device': {self.device!r} is not a device (cpu, cuda, cuda:1 or auto)") \
                    from None


@dataclass
class EvalConfig:
    sizes: list[int] = field(default_factory=list)  # test resolutions evaluated after training ([] = none)
    batch_size: int = 128  # evaluation batch (no gradients, so larger than training's)
    throughput: bool = True  # also measure images/s per size (the cost of a strategy grows with resolution)


# -- dict conversion and type checking -----------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a config class, e.g. ``['data.path', 'optim.lr', ...]``."""
    keys = []
    for name, tp in _hints(cls).items():
        if name.startswith("_"):
            continue
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, f"{prefix}{name}.")
    return keys


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # match on the last part alone: "optim.learning_rate" vs "lr" is hopeless, "lrr" is not
        last = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            last, [v.rsplit(".", 1)[-1] for v in valid], n=3, cutoff=0.6)][:3]
    return f" (closest valid keys: {', '.join(close)})" if close else f" (valid keys: {', '.join(valid[:20])})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` (int -> float, list -> tuple, dict -> dataclass) or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _check(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"key {key!r}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=key + ".")
        raise bad
    if tp in (list, tuple) or origin in (list, tuple):
        return _check_sequence(value, tp, key, bad)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        vt = args[1] if args else Any
        return {str(k): _check(v, vt, f"{key}.{k}") for k, v in value.items()}
    return _check_scalar(value, tp, bad)


def _check_sequence(value: Any, tp: Any, key: str, bad: ConfigError) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise bad
    if origin is list:
        return [_check(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise ConfigError(f"key {key!r}: expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))


def _check_scalar(value: Any, tp: Any, bad: ConfigError) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. a folder named 2024
            return str(value)
        raise bad
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    return value


# Fields that have a range, by name in any section: (lowest, highest or None, the interval's kind:
# "[)" by default, "[]", "(]" or "()" for open or closed ends). A count of zero or less (a batch, an
# interval, the epochs, test sizes) would fail late, mid-run, or do nothing silently; a negative
# decay, warm-up or schedule factor would make the learning rate negative; a probability past 1
# or a scale of 0 would be applied as it stands.
_BOUNDS: dict[str, tuple] = {
    "batch_size": (1, None), "workers": (0, None), "epochs": (1, None), "log_interval": (1, None),
    "interval": (1, None), "num_queries": (1, None), "sizes": (1, None), "decay": (0, 1),
    "lr_base_batch": (1, None), "lr": (0, None), "backbone_lr": (0, None), "betas": (0, 1),
    "label_smoothing": (0, 1), "synthetic_train": (1, None), "synthetic_val": (1, None), "seed": (0, 2**31),
    "weight_decay": (0, None), "warmup_epochs": (0, None), "warmup_lr_ratio": (0, 1, "[]"),
    "min_lr_ratio": (0, 1, "[]"), "poly_power": (0, None), "step_gamma": (0, 1, "(]"), "clip_grad": (0, None, "()"),
    "head_lr_mult": (0, None), "mixup": (0, None), "cutmix": (0, None), "color_jitter": (0, None),
    "re_prob": (0, 1, "[]"), "hflip": (0, 1, "[]"), "flip": (0, 1, "[]"), "re_count": (0, None),
    "scale": (0, 1, "(]"), "ratio": (0, None, "()"), "scale_range": (0, None, "()"), "scales": (0, None, "()"),
    "dropout": (0, 1), "head_dropout": (0, 1), "eos_coef": (0, None), "dim": (1, None), "num_heads": (1, None),
    "enc_layers": (0, None), "dec_layers": (1, None), "ffn_dim": (1, None), "pos_grid": (1, None),
    "head_dim": (1, None), "backbone_stages": (1, 4, "[]"), "figure_images": (0, None), "img_size": (1, None),
    "crop_size": (1, None), "slide_crop": (1, None), "slide_stride": (1, None), "layer_decay": (0, 1, "(]")}
_ORDERED = {"scale", "ratio", "scale_range"}  # (min, max) pairs
# timm.create_model arguments in ``model.kwargs`` (a number, or one per stage as MiT's lists): a
# drop rate past 1 fails at the first training step, a zero depth or width at the model's build
_MODEL_KWARG_BOUNDS: dict[str, tuple] = {
    "depth": (1, None), "depths": (1, None), "num_heads": (1, None), "embed_dim": (1, None),
    "embed_dims": (1, None), "patch_size": (1, None), "mlp_ratio": (0, None, "()"), "mlp_ratios": (0, None, "()"),
    "sr_ratios": (1, None), "reg_tokens": (0, None), "drop_rate": (0, 1), "pos_drop_rate": (0, 1),
    "patch_drop_rate": (0, 1), "proj_drop_rate": (0, 1), "attn_drop_rate": (0, 1), "drop_path_rate": (0, 1)}


def _check_bounds(value: Any, key: str, bounds: dict[str, tuple] = _BOUNDS) -> None:
    name = key.rsplit(".", 1)[-1]
    if name == "kwargs" and isinstance(value, Mapping):
        for k, v in value.items():
            _check_bounds(v, f"{key}.{k}", _MODEL_KWARG_BOUNDS)
        return
    if name not in bounds or value is None:
        return
    low, high, kind = (*bounds[name], "[)")[:3]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        if bounds is _BOUNDS:
            return  # typed fields were checked before; a wrong type is reported there
        raise ConfigError(f"key {key!r}: {value!r} is not a number (or a list of numbers)")
    for v in values:
        if isinstance(v, float) and v != v:
            raise ConfigError(f"key {key!r}: {value!r} is not a number")
        below = v <= low if kind[0] == "(" else v < low
        above = high is not None and (v > high if kind[1] == "]" else v >= high)
        if below or above:
            span = (f"{'above' if kind[0] == '(' else 'at least'} {low}" if high is None
                    else f"in {kind[0]}{low}, {high}{kind[1]}")
            raise ConfigError(f"key {key!r}: {value!r} is out of range: must be {span}")
    if name in _ORDERED and len(values) == 2 and values[0] > values[1]:
        raise ConfigError(f"key {key!r}: {list(value)!r} is (min, max): the first must not exceed the second")


def from_dict(cls: type[C], d: Mapping[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a nested dict; missing keys keep their defaults, unknown keys and values
    out of range (``_BOUNDS``) are errors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"section {prefix.rstrip('.') or '<top>'!r}: expected a mapping, got {d!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    root_keys = dotted_keys(cls, prefix)
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"unknown key {prefix + str(k)!r}{_suggest(prefix + str(k), root_keys)}")
        kwargs[k] = _check(v, hints[k], prefix + k)
        _check_bounds(kwargs[k], prefix + k)
    return cls(**kwargs)


# -- files and overrides -------------------------------------------------------------------------
def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key given twice in one mapping is an error (YAML would keep the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # a complex key: yaml's own constructor names it
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (again on line {line})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, cls: type[C], base: C | None = None) -> C:
    """Read a YAML file onto the defaults of ``cls`` (or onto ``base``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    try:
        return from_dict(cls, _merged(to_dict(base), data) if base is not None else data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back), as the run's recipe:
    ``run.resume`` is an action, not part of it, and is left out, so that the file given as
    ``--config`` starts a new run instead of continuing the old one."""
    d = to_dict(cfg)
    if isinstance(d.get("run"), dict) and "resume" in d["run"]:
        d["run"]["resume"] = None
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


def _field_type(cls: type, parts: list[str], valid: list[str]) -> Any:
    """The declared type at a dotted path; into a ``dict[str, X]`` any key is allowed."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                key = ".".join(parts)
                raise ConfigError(f"unknown key {key!r}{_suggest(key, valid)}")
            tp = hints[part]
        elif tp is dict or typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            return Any
        else:
            raise ConfigError(f"key {'.'.join(parts)!r}: {'.'.join(parts[:i])!r} has no sub-keys")
    return tp


def override(cfg: C, key: str, value: Any) -> C:
    """A copy of ``cfg`` with the dotted ``key`` set to ``value`` (type-checked)."""
    parts = key.split(".")
    _field_type(type(cfg), parts, dotted_keys(type(cfg)))  # raises on an unknown key
    d = to_dict(cfg)
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key {key!r}: cannot set a sub-key of a non-mapping value")
    node[parts[-1]] = value
    return from_dict(type(cfg), d)


def _is_str_type(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _check_flow_mapping(value: Any, key: str) -> None:
    """YAML reads ``{depth:1}`` as the key ``"depth:1"`` with no value (a flow mapping needs a space
    after the colon): a model argument that would silently be dropped."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                name, _, rest = k.partition(":")
                raise ConfigError(f"--set {key}: {k!r} reads as a key without a value; YAML needs a space "
                                  f"after the colon: {{{name}: {rest}}}")
            _check_flow_mapping(v, key)
    elif isinstance(value, list):
        for v in value:
            _check_flow_mapping(v, key)


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """Apply ``["optim.lr=1e-3", "model.kwargs.depth=2"]``: values are YAML, checked against the field type."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        tp = _field_type(type(cfg), key.split("."), dotted_keys(type(cfg)))
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if _is_str_type(tp) and value is not None and not isinstance(value, str):
            value = text  # keep "2024" or "yes" literally for a string field
        _check_flow_mapping(value, key)
        cfg = override(cfg, key, value)
    return cfg


__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RunConfig", "apply_overrides",
           "dotted_keys", "from_dict", "load_config", "override", "save_config", "to_dict"]
