"""Positional strategies, chosen by name: ``vitpe.pos.build('peg+rope_mixed', dim=..., ...)``.

``names()`` lists the single strategies; any of them can be combined with ``+``.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from ..registry import Registry
from .absolute import Learned, SinCos2d
from .base import BlockPos, Grid, GridShapedStrategy, PosContext, PosStrategy
from .compose import Compose
from .conv import PEG, MixFFN
from .relative import RelativeBias
from .rope import RopeAxial, RopeMixed

STRATEGIES: Registry[PosStrategy] = Registry("positional strategy")
for _cls in (PosStrategy, SinCos2d, Learned, PEG, MixFFN, RopeAxial, RopeMixed, RelativeBias):
    STRATEGIES.register(_cls.name)(_cls)


def names() -> list[str]:
    """Every single strategy name; combine them with ``+``."""
    return STRATEGIES.names()


def split(spec: str, registry: Registry[PosStrategy] = STRATEGIES) -> list[str]:
    """``'peg + rope_mixed'`` -> ``['peg', 'rope_mixed']``, each checked against ``registry``."""
    parts = [p.strip() for p in str(spec).split("+")]
    if not any(parts):
        raise KeyError(f"empty positional strategy {spec!r}; valid: {', '.join(registry.names())}")
    if not all(parts):
        raise KeyError(f"positional strategy {spec!r} has an empty part: join names with one '+', e.g. 'peg+rope_mixed'")
    for p in parts:
        registry.get(p)
    if len(parts) > 1 and "none" in parts:
        raise KeyError(f"'none' cannot be combined with other strategies in {spec!r}")
    return parts


def _options(cls: type) -> set[str]:
    """The keyword options a strategy's class and its bases take."""
    names: set[str] = set()
    for c in cls.__mro__:
        if "__init__" in vars(c) and c is not object:
            params = inspect.signature(vars(c)["__init__"]).parameters.values()
            names |= {q.name for q in params if q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD) and q.name != "self"}
    return names


def build(spec: str, *, dim: int, num_heads: int, depth: int, grid: Grid, num_prefix: int = 0,
          pos_kwargs: dict[str, dict[str, Any]] | None = None,
          registry: Registry[PosStrategy] = STRATEGIES) -> PosStrategy:
    """Build the strategy ``spec`` (a name or names joined by ``+``) from ``registry``.

    ``pos_kwargs`` maps a strategy name to its options, e.g. ``{'peg': {'after': [0, 1]}}``.
    """
    parts = split(spec, registry)
    pos_kwargs = dict(pos_kwargs or {})
    unknown = set(pos_kwargs) - set(parts)
    if unknown:
        raise KeyError(f"pos_kwargs names {sorted(unknown)}, which are not part of {spec!r}")
    common = dict(dim=dim, num_heads=num_heads, depth=depth, grid=grid, num_prefix=num_prefix)
    for p in parts:
        opts = pos_kwargs.get(p, {})
        if not isinstance(opts, Mapping):
            raise TypeError(f"pos_kwargs[{p!r}] must be a mapping of options, e.g. {{'{p}': {{...}}}}, got {opts!r}")
        options = _options(registry.get(p)) - set(common)
        bad = sorted(set(opts) - options)
        if bad:
            raise TypeError(f"{p}: unknown option(s) {bad} in pos_kwargs; its options: {sorted(options) or 'none'}")
    built = [registry.build(p, **common, **pos_kwargs.get(p, {})) for p in parts]
    return built[0] if len(built) == 1 else Compose(built)


__all__ = ["BlockPos", "Compose", "Grid", "GridShapedStrategy", "Learned", "MixFFN", "PEG", "PosContext",
           "PosStrategy", "RelativeBias", "RopeAxial", "RopeMixed", "STRATEGIES", "SinCos2d", "build",
           "names", "split"]
