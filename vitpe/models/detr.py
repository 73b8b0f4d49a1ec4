"""DETR (Carion et al., "End-to-End Object Detection with Transformers") whose encoder's 2D
positional strategy is chosen by name.

    model = DETR(num_classes=3, backbone="resnet18", frozen_bn=False, pos="rope_mixed", num_queries=50)
    out = model(images, mask)  # images (B, 3, H, W) padded, mask (B, H, W) True on padding

``out['pred_logits']`` is ``(B, Q, K + 1)`` (the last class is "no object"), ``out['pred_boxes']``
``(B, Q, 4)`` normalised ``(cx, cy, w, h)`` relative to each image's unpadded size, and
``out['aux_outputs']`` holds the same for every earlier decoder layer (auxiliary losses).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from .detr_backbone import build_backbone
from .detr_transformer import DetrTransformer, SpatialPrior


class BoxHead(nn.Module):
    """DETR's 3-layer box MLP: ``(..., Q, C)`` -> ``(..., Q, 4)`` in ``[0, 1]``. Given ``refs``
    ``(Q, 2)``, logits of per-query reference centres, it predicts the centre as an offset from
    them in logit space (Deformable DETR's reference points, without the deformable attention)."""

    def __init__(self, dim: int, layers: int = 3) -> None:
        super().__init__()
        dims = [dim] * layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor, refs: Tensor | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        if refs is not None:
            x = x + F.pad(refs, (0, 2)).to(x.dtype)
        return x.sigmoid()


class DETR(nn.Module):
    """Backbone -> 1x1 projection -> encoder (positional strategy ``pos``) -> decoder over
    ``num_queries`` learned queries -> class and box heads after every decoder layer."""

    def __init__(self, *, num_classes: int, backbone: str = "resnet50", backbone_weights: str | None = None,
                 frozen_bn: bool = True, freeze_stem: bool = False, backbone_pos: str | None = None,
                 backbone_stages: int = 4,
                 dim: int = 256, num_heads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 ffn_dim: int = 2048, dropout: float = 0.1, num_queries: int = 100, pos: str = "sine",
                 pos_kwargs: dict[str, dict[str, Any]] | None = None, pos_grid: int = 32,
                 aux_loss: bool = True, box_refs: bool = False, spatial_prior: bool = False) -> None:
        super().__init__()
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.backbone = build_backbone(backbone, weights=backbone_weights, frozen_bn=frozen_bn,
                                       freeze_stem=freeze_stem, pos=backbone_pos, stages=backbone_stages)
        self.size_divisibility: int = self.backbone.stride  # pad batches to a multiple of this
        self.input_proj = nn.Conv2d(self.backbone.num_channels, dim, kernel_size=1)
        self.transformer = DetrTransformer(dim=dim, num_heads=num_heads, enc_layers=enc_layers,
                                           dec_layers=dec_layers, ffn_dim=ffn_dim, dropout=dropout, pos=pos,
                                           pos_kwargs=pos_kwargs, pos_grid=(pos_grid, pos_grid))
        self.query_embed = nn.Embedding(num_queries, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.bbox_embed = BoxHead(dim)
        self.box_refs = None
        if box_refs:
            # queries spread over the image from the first step, so that Hungarian matching pairs
            # each object with a nearby query instead of all queries collapsing onto one mean box;
            # the cross-attention also reads the encoder's encoding at each centre (see DetrTransformer)
            self.box_refs = nn.Parameter(torch.logit(torch.rand(num_queries, 2) * 0.9 + 0.05))
            last = self.bbox_embed.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.constant_(last.bias, 0.0)
            with torch.no_grad():
                last.bias[2:] = -2.0  # small initial boxes (sigmoid(-2) = 0.12), as Deformable DETR
        if spatial_prior and not box_refs:
            raise ValueError("spatial_prior needs box_refs: the prior is centred on each query's reference point")
        self.spatial_prior = SpatialPrior(num_queries, num_heads) if spatial_prior else None

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, Any]:
        """``images`` ``(B, 3, H, W)``, ``mask`` ``(B, H, W)`` True on padding."""
        feat = self.backbone(images)  # (B, C, H/s, W/s)
        # a feature cell is padding when its top-left pixel is (DETR's nearest-neighbour rule)
        fmask = F.interpolate(mask[:, None].float(), size=feat.shape[-2:]).bool()[:, 0]
        refs = None if self.box_refs is None else self.box_refs.sigmoid()
        hs = self.transformer(self.input_proj(feat), fmask, self.query_embed.weight, refs,
                              self.spatial_prior)  # (L, B, Q, C)
        logits, boxes = self.heads(hs)
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


    def heads(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and boxes of every decoder layer's output, in the heads' own dtype (float32)
        under autocast too: in bfloat16 a box coordinate of a 1333-pixel image would be off by up to
        2.6 pixels (8 bits of mantissa), enough to move detections across COCO's IoU thresholds."""
        amp_off = torch.autocast(hs.device.type, enabled=False) if hs.device.type in ("cuda", "cpu") \
            else contextlib.nullcontext()
        with amp_off:
            hs = hs.to(self.class_embed.weight.dtype)
            return self.class_embed(hs), self.bbox_embed(hs, self.box_refs)


@torch.no_grad()
def postprocess(out: dict[str, Tensor], sizes: Tensor) -> list[dict[str, Tensor]]:
    """Model outputs -> per image ``scores`` ``(Q,)``, contiguous ``labels`` ``(Q,)`` and ``boxes``
    ``(Q, 4)`` absolute ``xyxy`` for ``sizes`` ``(B, 2)`` = (height, width) of each original image."""
    prob = out["pred_logits"].float().softmax(-1)[..., :-1]  # drop "no object"
    scores, labels = prob.max(-1)
    boxes = box_convert(out["pred_boxes"].float(), "cxcywh", "xyxy")
    h, w = sizes.float().unbind(1)
    boxes = boxes * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


__all__ = ["BoxHead", "DETR", "postprocess"]
