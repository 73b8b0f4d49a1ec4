"""timm ViT checkpoints (ViT, DeiT, DeiT III, the RoPE ViTs of eva.py) onto vitpe's ``VisionTransformer``.

The layout and keys are timm's, so most of a checkpoint loads as it is; what differs is mapped here:
the learned table moves to the strategy (with the grid it was trained at, so that it is resampled
on load), layer scale is folded into the projections it scales, a patch kernel of another size is
resampled, and the RoPE ViTs' q and k rows are relabelled to vitpe's rotation pairs.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import Tensor, nn

if TYPE_CHECKING:
    from .vit import VisionTransformer

_logger = logging.getLogger(__name__)


def _unwrap(state_dict: dict[str, Any]) -> dict[str, Tensor]:
    """Accept a bare state dict or one nested under 'model' / 'state_dict' (training checkpoints)."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            return state_dict[key]
    return state_dict


def _module_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VisionTransformer) -> dict[str, Tensor]:
    """Map a timm ViT/DeiT checkpoint (or a vitpe one) onto ``model``.

    timm's ``pos_embed`` goes to the model's ``learned`` strategy (resampled to its grid on load);
    a model without one drops it with a warning. Layer scale (DeiT III's ``blocks.i.ls1.gamma`` /
    ``ls2.gamma``, the RoPE ViTs' ``gamma_1`` / ``gamma_2``) is folded into ``attn.proj`` / ``mlp.fc2``,
    which computes the same function. A patch-embedding kernel of another patch size is
    resampled as timm does. timm's RoPE ViTs (``vit_*_patch16_rope_224``, ``..._rope_mixed_224``,
    ``..._rope_reg*_gap_256``) go through ``_from_timm_rope``.
    """
    sd = dict(_unwrap(state_dict))
    eva = "rope.freqs" in sd or any(k.endswith((".gamma_1", ".gamma_2", ".attn.q_bias")) for k in sd)  # eva.py's
    sd = _fold_layer_scale(sd)
    if eva:
        sd = _from_timm_rope(sd, model)
    if "pos_embed" in sd:
        learned = model.pos.find("learned")
        table = sd.pop("pos_embed")
        if learned is None:
            _logger.warning("checkpoint has a 'pos_embed' table (learned, or a fixed sin-cos table saved as MoCo "
                            "v3's and MAE's are) but the model's strategy is %r; dropped (pos='learned' loads it "
                            "as it is)", model.pos.name)
        else:
            path, prefix, weight = _module_path(model, learned), learned.table_prefix, sd.get("patch_embed.proj.weight")
            grid = _pretrained_grid(model, weight, table.shape[1] - prefix)
            if grid is None and prefix and table.dim() == 3:
                # a table without prefix rows (timm's no_embed_class: DeiT III, the RoPE ViTs' "ape"
                # tables) for a model with them: zero rows give those tokens no position, as there
                grid = _pretrained_grid(model, weight, table.shape[1])
                if grid is not None:
                    table = F.pad(table, (0, 0, prefix, 0))
            sd[f"{path}.pos_embed"] = table
            if grid is not None and f"{path}.grid" not in sd:
                sd[f"{path}.grid"] = torch.tensor(grid)
    key = "patch_embed.proj.weight"
    if key in sd and sd[key].shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        sd[key] = resample_patch_embed(sd[key], list(model.patch_embed.proj.weight.shape[-2:]))
    for k in ("dist_token", "head_dist.weight", "head_dist.bias"):  # DeiT distillation extras
        if k in sd:
            raise ValueError(f"checkpoint key {k!r}: distilled DeiT checkpoints are not supported")
    return sd


def _pretrained_grid(model: nn.Module, patch_weight: Tensor | None, rows: int) -> tuple[int, int] | None:
    """The grid of a checkpoint's table as timm's loader recovers it (``get_pretrained_grid_size``):
    the image size the checkpoint was made at (the model's ``pretrained_model_args``, else its
    ``pretrained_cfg`` input size) over the checkpoint's patch size, where that accounts for every
    row of the table; else None."""
    if patch_weight is None or patch_weight.ndim != 4:
        return None
    size = (getattr(model, "pretrained_model_args", None) or {}).get("img_size")
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = (int(size[0]) // patch_weight.shape[-2], int(size[1]) // patch_weight.shape[-1])
    return grid if grid[0] * grid[1] == rows else None


def _fold_layer_scale(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``x + gamma * proj(y)`` is ``x + proj'(y)`` with ``proj``'s rows scaled by ``gamma``: timm's
    layer scale (``blocks.i.ls1.gamma`` / ``ls2.gamma``; eva.py's ``gamma_1`` / ``gamma_2``) folded
    into ``attn.proj`` / ``mlp.fc2``."""
    scales = {".ls1.gamma": "attn.proj", ".ls2.gamma": "mlp.fc2", ".gamma_1": "attn.proj", ".gamma_2": "mlp.fc2"}
    for key in [k for k in sd if k.endswith(tuple(scales))]:
        suffix = next(s for s in scales if key.endswith(s))
        linear = f"{key[: -len(suffix)]}.{scales[suffix]}"
        gamma = sd.pop(key)
        if f"{linear}.weight" not in sd:
            raise ValueError(f"checkpoint key {key!r}: layer scale without {linear}.weight to fold it into")
        sd[f"{linear}.weight"] = sd[f"{linear}.weight"] * gamma[:, None]
        if f"{linear}.bias" in sd:
            sd[f"{linear}.bias"] = sd[f"{linear}.bias"] * gamma
    return sd


def _from_timm_rope(sd: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """A timm RoPE ViT (eva.py's blocks, layer scale already folded) -> vitpe's keys, computing the
    same function.

    - ``rope.freqs`` (``rope_mixed``'s learned frequencies, same shape and order) goes to the model's
      ``rope_mixed``; a model without one drops it with a warning.
    - timm rotates channel pairs ``(2i, 2i+1)`` of a head, vitpe pairs ``(i, i + D/2)``, both by
      frequency ``i``: each head's q and k rows of ``qkv`` are relabelled to match (a permutation of
      q and k alike, which leaves attention without rotation unchanged too).
    - EVA's attention (``attn.q_bias`` and ``attn.v_bias`` apart, the key's bias zero:
      ``vit_*_patch16_rope_reg*_gap_256``) comes with EVA's rotary layout: the first half of the
      angles follows the row (``grid_indexing='ij'``; RoPE-ViT's and vitpe's the column), at
      temperature 10000 and positions rescaled to the training grid (``ref_feat_shape``). The biases
      become ``qkv.bias`` and the relabelling swaps the halves too; the model's ``rope_axial`` must
      have ``theta=10000`` (and ``ref_grid``, for other resolutions)."""
    sd = dict(sd)
    axial, mixed = model.pos.find("rope_axial"), model.pos.find("rope_mixed")
    if axial is None and mixed is None:
        _logger.warning("checkpoint is a timm RoPE ViT (eva.py's blocks) but the model's strategy %r has no rotary "
                        "embedding: q and k will not be rotated as they were in training", model.pos.name)
    if "rope.freqs" in sd:
        freqs = sd.pop("rope.freqs")
        if mixed is None:
            _logger.warning("checkpoint has rope_mixed's 'rope.freqs' but the model's strategy is %r; dropped",
                            model.pos.name)
        else:
            sd[f"{_module_path(model, mixed)}.freqs"] = freqs
    eva = _eva_qkv_bias(sd)
    if eva and axial is not None:
        _check_eva_rope(axial)
    elif eva and mixed is not None:
        _logger.warning("checkpoint has EVA's fixed axial rotary embedding but the model's strategy is %r, whose "
                        "learned frequencies the checkpoint does not have (pos='rope_axial' with theta=10000 loads "
                        "it as trained)", model.pos.name)
    heads = model.blocks[0].attn.num_heads
    for key in [k for k in sd if k.endswith(("attn.qkv.weight", "attn.qkv.bias"))]:
        w = sd[key]
        head_dim = w.shape[0] // (3 * heads)
        half = head_dim // 2
        # vitpe's angle a is timm's angle a (RoPE-ViT's column-first order) or, in EVA's row-first
        # order, the other half's: vitpe c <- timm order[c]
        angle = [(c % half + (half // 2 if eva else 0)) % half for c in range(head_dim)]
        order = torch.tensor([2 * angle[c] + c // half for c in range(head_dim)])
        w = w.reshape(3, heads, head_dim, *w.shape[1:])
        sd[key] = torch.cat([w[:2, :, order], w[2:]]).reshape(sd[key].shape)
    return sd


def _eva_qkv_bias(sd: dict[str, Tensor]) -> bool:
    """EVA's ``attn.q_bias`` and ``attn.v_bias`` (the key's bias is zero) -> ``attn.qkv.bias``, in
    place; whether there were any."""
    found = False
    for q_key in [k for k in sd if k.endswith("attn.q_bias")]:
        prefix = q_key[: -len("q_bias")]
        q, v = sd.pop(q_key), sd.pop(f"{prefix}v_bias", None)
        if v is None:
            raise ValueError(f"checkpoint key {q_key!r} without {prefix}v_bias: not EVA's attention biases")
        sd[f"{prefix}qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        found = True
    return found


def _check_eva_rope(axial: nn.Module) -> None:
    """EVA's rotary embedding turns at temperature 10000; RoPE-ViT's, vitpe's default, at 100."""
    if axial.theta != 10000:
        raise ValueError(f"checkpoint has EVA's rotary embedding (temperature 10000; eva.py's attn.q_bias / v_bias) "
                         f"but the model's rope_axial has theta={axial.theta:g}: build it with "
                         f"pos_kwargs={{'rope_axial': {{'theta': 10000, 'ref_grid': [16, 16]}}}} (ref_grid: the "
                         f"training grid, 16 x 16 for timm's vit_*_rope_reg*_gap_256)")
    if axial.ref_grid is None:
        _logger.warning("checkpoint has EVA's rotary embedding, which rescales positions to its training grid at "
                        "other resolutions; rope_axial without ref_grid does not (set pos_kwargs={'rope_axial': "
                        "{'theta': 10000, 'ref_grid': [16, 16]}} for timm's vit_*_rope_reg*_gap_256)")
