"""Grid maths shared by the strategies: closed-form tables, resampling, token<->map reshapes, rotation."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import kernels

Grid = tuple[int, int]


def grid_coords(grid: Grid, device: torch.device | None = None, stride: int = 1) -> tuple[Tensor, Tensor]:
    """Row and column of every token, in row-major token order; each ``(H*W,)`` float32.

    With ``stride`` > 1, ``grid`` is a grid reduced by a ``stride x stride`` strided convolution
    (spatial-reduction attention) and the positions are its cells' centres in the units of the
    full grid: cell ``j`` covers rows ``j*s .. j*s+s-1``, so its centre is ``j*s + (s-1)/2``.
    """
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float32) * stride + (stride - 1) / 2
    cols = torch.arange(w, device=device, dtype=torch.float32) * stride + (stride - 1) / 2
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return r.reshape(-1), c.reshape(-1)


def reduced_grid(grid: Grid, stride: int) -> Grid:
    """The grid left by a ``stride x stride`` convolution with stride ``stride`` and no padding
    (a remainder is dropped); a side shorter than ``stride`` is padded to one cell."""
    return max(grid[0] // stride, 1), max(grid[1] // stride, 1)


def sincos_1d(pos: Tensor, dim: int, temperature: float = 10000.0, interleave: bool = False) -> Tensor:
    """``(N,)`` positions -> ``(N, dim)``: ``[sin(pos * w_k), cos(pos * w_k)]`` with
    ``w_k = temperature ** (-k / (dim / 2))`` for ``k < dim / 2`` (all sines, then all cosines, as
    MAE's tables), or with ``interleave`` ``sin w_0, cos w_0, sin w_1, ...`` (DETR's
    ``PositionEmbeddingSine``)."""
    if dim % 2:
        raise ValueError(f"sine-cosine encoding needs an even width, got {dim}")
    omega = temperature ** (-torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim // 2))
    angles = pos[:, None] * omega[None, :]
    if interleave:
        return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid: Grid, dim: int, temperature: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """``(H*W, dim)``: the first half of the channels encodes the column, the second half the row,
    each half all sines then all cosines: MAE's ``get_2d_sincos_pos_embed`` on any grid, so the
    fixed tables of MAE-style checkpoints are the ones vitpe computes."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine encoding needs a width divisible by 4, got {dim}")
    rows, cols = grid_coords(grid, device)
    return torch.cat([sincos_1d(cols, dim // 2, temperature), sincos_1d(rows, dim // 2, temperature)], dim=1)


def resample_table(table: Tensor, old_grid: Grid, new_grid: Grid, mode: str = "bicubic") -> Tensor:
    """Resample ``(..., H*W, C)`` token tables (or ``(C, H, W)`` maps via ``resample_map``) from
    ``old_grid`` to ``new_grid``; the same grid is returned unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    lead = table.shape[:-2]
    if table.shape[-2] != old_grid[0] * old_grid[1]:
        raise ValueError(f"table has {table.shape[-2]} tokens, grid {old_grid[0]}x{old_grid[1]} needs "
                         f"{old_grid[0] * old_grid[1]}")
    maps = rearrange(table.reshape(-1, *table.shape[-2:]), "b (h w) c -> b c h w", h=old_grid[0])
    maps = resample_map(maps, new_grid, mode)
    return rearrange(maps, "b c h w -> b (h w) c").reshape(*lead, -1, table.shape[-1])


def resample_map(maps: Tensor, size: Grid, mode: str = "bicubic") -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, *size)``, antialiased when shrinking, computed in float32.

    ``bicubic`` and ``bilinear`` are torch's (and PIL's) antialiased resampling, done as two small
    products with per-axis weights (``resampling_matrix``): the same numbers as ``F.interpolate``
    with ``antialias=True``, also for outputs one column wide (where torch's kernels repeat the
    first row), and a backward that ``torch.compile`` can trace with symbolic sizes (torch's
    antialiased backward fails on them). Other modes go to ``F.interpolate``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode not in _FILTERS:
        return F.interpolate(maps.float(), size=tuple(size), mode=mode).to(maps.dtype)
    rows = resampling_matrix(maps.shape[-2], size[0], mode, maps.device)
    cols = resampling_matrix(maps.shape[-1], size[1], mode, maps.device)
    with torch.autocast(maps.device.type, enabled=False):  # float32 products, also under autocast
        out = rows @ maps.float() @ cols.t()
    return out.to(maps.dtype)


def resampling_matrix(size: int, new_size: int, mode: str = "bicubic",
                      device: torch.device | None = None) -> Tensor:
    """``(new_size, size)`` float32: row ``i`` holds the weights that make output ``i`` of an
    antialiased resampling of a ``size``-long axis (half-pixel centres, the filter widened by the
    scale when shrinking, weights normalised over the input), as ``F.interpolate(...,
    antialias=True)`` and PIL compute them."""
    scale = size / new_size
    stretch = 1.0 / scale if scale > 1 else 1.0  # the filter widens when shrinking
    return filter_weights(scale, stretch, new_size, size, mode, device)


def filter_weights(scale: float | Tensor, stretch: float | Tensor, rows: int, size: int, mode: str = "bicubic",
                   device: torch.device | None = None) -> Tensor:
    """``(..., rows, size)``: output row ``i`` centred at input ``scale * (i + 0.5)``, the filter
    of ``mode`` widened by ``1 / stretch``, weights normalised over the input. ``scale`` and
    ``stretch`` are numbers, or tensors ``(..., 1, 1)`` for one length per leading index."""
    out = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
    src = torch.arange(size, device=device, dtype=torch.float32)[None, :]
    w = _FILTERS[mode]((src + 0.5 - scale * (out + 0.5)) * stretch)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def bilinear_matrix(size: int, new_size: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``(new_size, size)``: the weights of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis (no antialiasing): output ``i`` reads the input at ``(i + 0.5) * size / new_size
    - 0.5``, clamped at 0, from its two neighbours (the second clamped at the end)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32  # as torch computes the positions
    src = ((torch.arange(new_size, device=device, dtype=work) + 0.5) * (size / new_size) - 0.5).clamp(min=0)
    left = src.floor().long().clamp(max=size - 1)
    frac = src - left
    right = (left + 1).clamp(max=size - 1)
    return _two_taps(size, left, right, frac).to(dtype)


def _two_taps(size: int, left: Tensor, right: Tensor, frac: Tensor) -> Tensor:
    """``(len(left), size)``: row ``i`` takes ``1 - frac[i]`` of input ``left[i]`` and ``frac[i]`` of
    ``right[i]`` (the two added where they are the same input), in ``frac``'s dtype and device."""
    m = torch.zeros(len(left), size, device=frac.device, dtype=frac.dtype)
    rows = torch.arange(len(left), device=frac.device)
    m.index_put_((rows, left), 1 - frac, accumulate=True)
    m.index_put_((rows, right), frac, accumulate=True)
    return m


def resize_bilinear(x: Tensor, size: Sequence[int], channels_last: bool = False) -> Tensor:
    """``x`` ``(..., H, W)`` (or ``(B, H, W, C)`` with ``channels_last``) resized bilinearly to
    ``size`` (``align_corners=False``, as ``F.interpolate``) as two products with
    ``bilinear_matrix``, each over a contiguous view, so that nothing is copied: no gathers forward
    and no scatter-add backward (a compiled bilinear resize of SegFormer's wide maps takes them, and
    ran at a fraction of the memory bandwidth: 45 % of MiT-B2's compiled step on an H100)."""
    H, W = (int(v) for v in size)
    if channels_last:  # (B, h, w, C): rows as (H, h) @ (B, h, w*C), then columns as (W, w) @ (B*H, w, C)
        B, h, w, C = x.shape
        x = x.contiguous()
        if h != H:
            x = torch.matmul(_weights(h, H, x), x.reshape(B, h, w * C)).reshape(B, H, w, C)
        if w != W:
            x = torch.matmul(_weights(w, W, x), x.reshape(B * H, w, C)).reshape(B, H, W, C)
        return x
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.contiguous()
    if w != W:  # columns: (..., h, w) @ (w, W)
        x = torch.matmul(x, _weights(w, W, x).t())
    if h != H:  # rows: (H, h) @ (..., h, W)
        x = torch.matmul(_weights(h, H, x), x.reshape(-1, h, W)).reshape(*lead, H, W)
    return x


def _weights(size: int, new_size: int, like: Tensor) -> Tensor:
    return bilinear_matrix(size, new_size, like.device, like.dtype if like.is_floating_point() else torch.float32)


def geometric_offsets(size: int, new_size: int) -> list[float]:
    """BEiT's positions for the ``size`` offsets of a relative-bias table's axis resized to
    ``new_size`` (``timm.layers.resize_rel_pos_bias_table``): the steps out from offset 0 grow
    geometrically, ``1, q, q^2, ...``, with ``q`` found (bisection in ``[1.01, 1.5]``) so that the
    last one reaches about ``new_size // 2``. Near offsets keep their values; far ones are spread out
    (enlarging) or, shrinking (where ``q`` stays at 1.01), kept about where they were."""
    def progression(q: float, n: int) -> float:
        return (1.0 - q ** n) / (1.0 - q)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if progression(q, size // 2) > new_size // 2:
            right = q
        else:
            left = q
    steps, cur = [], 1.0
    for i in range(size // 2):
        steps.append(cur)
        cur += q ** (i + 1)
    return [-v for v in reversed(steps)] + [0.0] + steps


def geometric_matrix(size: int, new_size: int, device: torch.device | None = None) -> Tensor:
    """``(new_size, size)`` float32: linear interpolation of an axis of ``size`` offsets at BEiT's
    positions (``geometric_offsets``) onto the integer offsets ``-(new_size // 2) ..
    new_size // 2``, the ends held beyond the range (as timm's ``RegularGridInterpolator``)."""
    src = torch.tensor(geometric_offsets(size, new_size), dtype=torch.float32)
    half = new_size // 2
    dst = torch.arange(-half, half + 0.1, 1.0, dtype=torch.float32)
    right = torch.bucketize(dst, src).clamp(max=size - 1)
    left = (right - 1).clamp(min=0)
    to_left, to_right = (dst - src[left]).clamp(min=0), (src[right] - dst).clamp(min=0)
    both = (to_left == 0) & (to_right == 0)  # on a source offset
    to_left, to_right = torch.where(both, 1.0, to_left), torch.where(both, 1.0, to_right)
    return _two_taps(size, left, right, to_left / (to_left + to_right)).to(device)


def resize_offset_table(tables: Tensor, size: Grid, mode: str = "bicubic") -> Tensor:
    """``(..., 2h-1, 2w-1)`` relative-bias tables -> ``(..., *size)``: ``bicubic`` resamples the
    offsets as a map (``resample_map``: every offset scaled with the grid, as Swin's fine-tuning
    does, antialiased when shrinking); ``geometric`` is BEiT's (``geometric_matrix``, on both axes
    when either changes, as timm), which keeps near offsets at their values."""
    if tuple(tables.shape[-2:]) == tuple(size):
        return tables
    if mode == "bicubic":
        lead = tables.shape[:-2]
        return resample_map(tables.reshape(1, -1, *tables.shape[-2:]), size).reshape(*lead, *size)
    if mode != "geometric":
        raise ValueError(f"a relative-bias table is resized 'bicubic' or 'geometric'; got {mode!r}")
    rows = geometric_matrix(tables.shape[-2], size[0], tables.device)
    cols = geometric_matrix(tables.shape[-1], size[1], tables.device)
    with torch.autocast(tables.device.type, enabled=False):
        return (rows @ tables.float() @ cols.t()).to(tables.dtype)


def cubic_filter(x: Tensor, a: float = -0.5) -> Tensor:
    """The cubic convolution filter with ``a = -0.5``, as antialiased bicubic resampling uses it."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def triangle_filter(x: Tensor) -> Tensor:
    """The linear filter of antialiased bilinear resampling."""
    return (1 - x.abs()).clamp(min=0)


_FILTERS = {"bicubic": cubic_filter, "bilinear": triangle_filter}


def to_map(x: Tensor, grid: Grid, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``(B, P + H*W, C)`` -> prefix ``(B, P, C)`` and map ``(B, C, H, W)``."""
    check_tokens(x, grid, num_prefix)
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    return prefix, rearrange(patches, "b (h w) c -> b c h w", h=grid[0])


def check_tokens(x: Tensor, grid: Grid, num_prefix: int) -> None:
    """Raise unless ``x`` ``(B, T, C)`` holds ``num_prefix`` tokens and then the grid's."""
    n = grid[0] * grid[1]
    if x.shape[1] != num_prefix + n:
        raise ValueError(f"got {x.shape[1]} tokens, grid {grid[0]}x{grid[1]} with {num_prefix} prefix "
                         f"tokens needs {num_prefix + n}")


def from_map(prefix: Tensor, maps: Tensor) -> Tensor:
    """Inverse of ``to_map``."""
    patches = rearrange(maps, "b c h w -> b (h w) c")
    return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches


class GridConv(nn.Module):
    """A depthwise convolution over the patch tokens' grid, zero-padded; prefix tokens pass through.

    With ``residual`` it is CPVT's PEG (``x + conv(x)``); without, SegFormer's Mix-FFN mixer.
    On a GPU it runs as ``vitpe.kernels.depthwise_conv_tokens``, in the tokens' own layout.
    Without ``residual``, ``forward(..., gelu=True)`` returns the exact GELU of the result, prefix
    tokens included; the kernel applies it as it writes (``Mlp`` asks for it when its activation is
    that GELU and ``fuses_gelu`` says so).
    """

    # With gradients, the GELU is inside the kernel by default because the kernels keep its
    # derivative (``depthwise.SAVE_GELU_GRAD``). Without that, it stays outside unless this is set:
    # the fused backward then keeps no pre-activation (1.9 GiB less at the peak for ViT-S at batch
    # 256) but recomputes it, and measured slower than torch's GELU backward plus the
    # weight-gradient kernel: 0.875 against 0.788 ms a call on ViT-S's shape, 0.81 of `learned` in
    # training against 0.82 (H200; docs/performance.md, eighth round)
    gelu_with_grad = False

    def __init__(self, dim: int, kernel_size: int = 3, residual: bool = False) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd whole number, got {kernel_size!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the grid keeps its size, got {kernel_size}")
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.residual = residual

    @property
    def fuses_gelu(self) -> bool:
        """Whether ``Mlp`` should hand its GELU to ``forward``: without the residual (as Mix-FFN's
        mixer), when no gradient is recorded (inference), ``gelu_with_grad`` is set, or the kernels
        keep GELU's derivative for the backward (``depthwise.SAVE_GELU_GRAD``)."""
        return not self.residual and (self.gelu_with_grad or bool(kernels.depthwise.SAVE_GELU_GRAD)
                                      or not torch.is_grad_enabled())

    def sums_input_bias_grad(self, x: Tensor) -> bool:
        """Whether ``forward(x, ..., input_bias=b)`` should be used for a bias ``b`` the caller adds
        to ``x`` (Mix-FFN's fc1): when gradients are recorded and the kernels' merged backward
        (``depthwise.BWD_MERGED``) sums ``b``'s gradient in passing, saving autograd's own pass."""
        return bool(kernels.depthwise.BWD_MERGED) and torch.is_grad_enabled() and \
            kernels.available(x, self.proj.kernel_size[0])

    def forward(self, x: Tensor, grid: Grid, num_prefix: int, gelu: bool = False,
                input_bias: Tensor | None = None) -> Tensor:
        """``input_bias``: a bias already added to ``x`` with its gradient cut (``.detach()``), whose
        gradient this call gives it (``sums_input_bias_grad``); the result does not depend on it."""
        if gelu and self.residual:
            raise ValueError("GridConv applies GELU only without the residual (Mix-FFN, not PEG)")
        if kernels.available(x, self.proj.kernel_size[0]):
            check_tokens(x, grid, num_prefix)
            return kernels.depthwise_conv_tokens(x, self.proj.weight, self.proj.bias, grid, num_prefix, self.residual,
                                                 gelu, input_bias)
        if input_bias is not None:
            # the bias's gradient through autograd: zero added, with the gradient of adding it
            x = x + (input_bias - input_bias.detach()).to(x.dtype)
        prefix, maps = to_map(x, grid, num_prefix)
        # tokens (B, N, C) already are a channels-last map, unless prefix tokens were sliced off;
        # keep that layout so the convolution runs channels-last without transposing copies
        maps = maps.contiguous(memory_format=torch.channels_last)
        out = self.proj(maps)
        if self.residual:
            out = out + maps
        out = from_map(prefix, out)
        return F.gelu(out) if gelu else out


def rope_tables(angles: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Angles ``(..., N, D/2)`` -> ``(cos, sin)`` each ``(..., P + N, D)`` in the rotate-half layout,
    with cos=1, sin=0 on the ``P`` prefix rows (prefix tokens stay unrotated)."""
    angles = torch.cat([angles, angles], dim=-1)
    pad = (0, 0, num_prefix, 0)
    return F.pad(angles.cos(), pad, value=1.0), F.pad(angles.sin(), pad, value=0.0)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, heads, T, D)``: pairs ``(i, i + D/2)`` turn by the angle of their frequency."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
