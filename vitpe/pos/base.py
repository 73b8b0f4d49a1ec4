"""The hooks every positional strategy implements, and what they hand to the blocks.

A strategy overrides only the hooks it needs; every default does nothing. A backbone runs:

    x = pos.embed(x, grid, num_prefix)              # add to tokens (sincos2d, learned)
    ctx = pos.context(grid, num_prefix)             # rotary tables, attention-logit bias
    for i, blk in enumerate(blocks):
        x = blk(x, ctx.block(i))                    # attention reads ctx.block(i).rope / .bias
        x = pos.after_block(x, i, grid, num_prefix) # PEG
    # and each block's FFN was built with pos.ffn_mixer(hidden_dim) (Mix-FFN)

``grid`` is always ``(rows, cols)`` of patch tokens; ``num_prefix`` is the number of class or
register tokens in front of them, which every strategy leaves without position.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import Tensor, nn

Grid = tuple[int, int]


@dataclass
class BlockPos:
    """What one block sees: the grid, and optionally rotary tables and an additive logits bias.

    ``rope`` is ``(cos, sin)``, each ``(heads or 1, T, head_dim)``, with cos=1 and sin=0 on the
    prefix rows so the whole sequence can be rotated at once. ``bias`` is ``(heads, T, S)``.
    When keys come from a reduced grid (spatial-reduction attention, ``S`` keys), ``rope_k``
    holds the keys' tables ``(heads or 1, S, head_dim)``; ``None`` means the keys use ``rope``.
    """

    grid: Grid
    num_prefix: int
    rope: tuple[Tensor, Tensor] | None = None
    bias: Tensor | None = None
    rope_k: tuple[Tensor, Tensor] | None = None


@dataclass
class PosContext:
    """Per-forward positional state, built once and shared by every block.

    ``rope`` tensors are ``(depth or 1, heads or 1, T, head_dim)``; a leading size of 1 means one
    table shared by all blocks. ``bias_terms`` are functions of the block index that return
    ``(heads, T, S)``; they are evaluated lazily so that a deep model never holds every block's
    ``T x S`` bias at once. ``kv_stride`` > 1 says the keys lie on the grid reduced by that stride
    (``functional.reduced_grid``); ``rope_k`` then holds the keys' rotary tables.
    """

    grid: Grid
    num_prefix: int
    rope: tuple[Tensor, Tensor] | None = None
    bias_terms: list[Callable[[int], Tensor]] = field(default_factory=list)
    kv_stride: int = 1
    rope_k: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _pick(tables: tuple[Tensor, Tensor] | None, i: int) -> tuple[Tensor, Tensor] | None:
        if tables is None:
            return None
        cos, sin = tables
        j = i if cos.shape[0] > 1 else 0
        return cos[j], sin[j]

    def block(self, i: int) -> BlockPos:
        bias = None
        for term in self.bias_terms:
            b = term(i)
            bias = b if bias is None else bias + b
        return BlockPos(self.grid, self.num_prefix, self._pick(self.rope, i), bias, self._pick(self.rope_k, i))

    def merge(self, other: PosContext) -> PosContext:
        if self.rope is not None and other.rope is not None:
            raise ValueError("two rotary strategies cannot be combined: q and k can be rotated only once")
        if self.kv_stride != other.kv_stride:
            raise ValueError(f"contexts for key strides {self.kv_stride} and {other.kv_stride} cannot be merged")
        mine = self.rope is not None
        return PosContext(self.grid, self.num_prefix, self.rope if mine else other.rope,
                          self.bias_terms + other.bias_terms, self.kv_stride,
                          self.rope_k if mine else other.rope_k)


def check_positive(strategy: str, **values: float) -> None:
    """A strategy's option that must be a positive number (a base of frequencies, a temperature)."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ValueError(f"{strategy}: {key} must be a positive number, got {v!r}")


class GridCache:
    """A small LRU cache of tensors derived per grid (tables, indices).

    Derived tables depend only on the grid and on parameters; while gradients are needed for those
    parameters the cache is bypassed, otherwise an unchanged grid costs nothing. A table is made
    again when its parameters change by any operation autograd sees (an optimizer step, an in-place
    update under ``torch.no_grad()``, timm's EMA, ``load_state_dict``, ``.to()``). An edit through
    ``.data`` (``p.data.mul_(m)``, as some momentum-teacher code does) is invisible to it: call
    ``clear_caches(model)`` (``model.clear_pos_cache()``) after such an edit. Under
    ``torch.compile`` it is bypassed too: the tables become part of the graph (where they are cheap
    and fused), and a lookup keyed by a symbolic grid would only cause recompilations.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any], params: tuple[Tensor, ...] = ()) -> Any:
        if torch.compiler.is_compiling():
            return make()
        if params and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return make()
        # Tables made under inference_mode cannot be saved for a later backward: keep them apart.
        key = (key, torch.is_inference_mode_enabled(), tuple(p._version for p in params),
               tuple(p.data_ptr() for p in params))
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def clear_caches(module: nn.Module) -> None:
    """Drop every table cached by ``module``'s positional strategies (see ``GridCache``): needed only
    after parameters were edited through ``.data``, which no version counter records."""
    for m in module.modules():
        cache = getattr(m, "_cache", None)
        if isinstance(cache, GridCache):
            cache.clear()


class PosStrategy(nn.Module):
    """Base class: every hook is a no-op. Subclasses set ``name`` and override what they need.

    Every strategy is built with the same keyword arguments, so backbones build any of them alike:
    ``dim`` (token width), ``num_heads``, ``depth`` (blocks in the stage), ``grid`` (the native
    token grid, e.g. 14x14 for 224/16) and ``num_prefix``; options of the strategy come after.
    """

    name: str = "none"

    def __init__(self, *, dim: int, num_heads: int, depth: int, grid: Grid, num_prefix: int = 0) -> None:
        super().__init__()
        self.dim, self.num_heads, self.depth = dim, num_heads, depth
        self.head_dim = dim // num_heads
        self.native_grid: Grid = (int(grid[0]), int(grid[1]))
        self.num_prefix = num_prefix
        self._cache = GridCache()

    # -- hooks -------------------------------------------------------------------------------
    def embed(self, x: Tensor, grid: Grid, num_prefix: int) -> Tensor:
        """``x``: ``(B, P + H*W, C)`` right after patch embedding and prefix tokens."""
        return x

    def context(self, grid: Grid, num_prefix: int, kv_stride: int = 1) -> PosContext:
        """Built once per forward; cache per grid what does not need gradients.

        ``kv_stride`` > 1: attention reads its keys from the grid reduced by that stride (MiT's
        spatial reduction), so what a strategy gives the attention must be made for query x key
        positions. Strategies that give the attention nothing ignore it.
        """
        return PosContext(grid, num_prefix, kv_stride=kv_stride)

    def after_block(self, x: Tensor, i: int, grid: Grid, num_prefix: int) -> Tensor:
        return x

    def ffn_mixer(self, hidden_dim: int) -> nn.Module | None:
        """A module called inside each FFN between fc1 and the activation, or None."""
        return None

    def adapt_state_dict(self, state_dict: dict[str, Tensor], prefix: str, old_grid: Grid) -> None:
        """Rewrite, in place, this strategy's entries of a checkpoint made for ``old_grid`` so that
        they fit ``self.native_grid``. Strategies without grid-shaped parameters do nothing."""

    # -- helpers -----------------------------------------------------------------------------
    def parts(self) -> list[PosStrategy]:
        """The strategies this one is made of (itself, unless it is a combination)."""
        return [self]

    def supports_kv_stride(self) -> bool:
        """Whether every part can build a context for keys on a reduced grid: parts that give
        the attention nothing (the default ``context``) can, others only if they take ``kv_stride``."""
        return all(type(p).context is PosStrategy.context
                   or "kv_stride" in inspect.signature(type(p).context).parameters for p in self.parts())

    def find(self, name: str) -> PosStrategy | None:
        return next((p for p in self.parts() if p.name == name), None)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, depth={self.depth}, grid={self.native_grid}"


class GridShapedStrategy(PosStrategy):
    """A strategy whose parameters are shaped by the grid (learned table, relative-bias table).

    It stores its grid in the state dict (buffer ``grid``) so that a checkpoint made at another
    resolution is recognised and resampled on load, even when the token count is the same
    (2x8 and 4x4). Checkpoints without the buffer (timm's): see ``grid_from_table``.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.register_buffer("grid", torch.tensor(self.native_grid, dtype=torch.long), persistent=True)

    table_key: str = ""  # the grid-shaped parameter, from which a checkpoint's grid can be inferred

    def grid_of_checkpoint(self, state_dict: dict[str, Tensor], prefix: str) -> Grid:
        """The grid a checkpoint was made for: its ``grid`` entry, else inferred from its table."""
        if prefix + "grid" in state_dict:
            g = state_dict[prefix + "grid"]
            return (int(g[0]), int(g[1]))
        key = prefix + self.table_key
        return self.grid_from_table(state_dict[key], key) if key in state_dict else self.native_grid

    def grid_from_table(self, table: Tensor, key: str) -> Grid:
        """The grid a checkpoint's table ``key`` (without a ``grid`` entry) was made for."""
        raise NotImplementedError(f"{key}: cannot tell the grid of a checkpoint without its 'grid' entry")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[override]
        if any(k.startswith(prefix) and k != prefix + "grid" for k in state_dict):
            old = self.grid_of_checkpoint(state_dict, prefix)
            if old != self.native_grid:
                self.adapt_state_dict(state_dict, prefix, old)
            state_dict[prefix + "grid"] = self.grid.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
