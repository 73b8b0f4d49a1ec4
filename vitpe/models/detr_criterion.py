"""DETR's set criterion: classification with a down-weighted "no object" class, L1 and generalized
IoU on matched boxes, the same on every decoder layer's output (auxiliary losses)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .detr_matcher import HungarianMatcher

Targets = list[dict[str, Tensor]]


class SetCriterion(nn.Module):
    """Losses ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``*_i`` for auxiliary layer ``i``), plus
    ``cardinality_error`` for logging. ``forward`` returns them unweighted; ``total`` weighs them.

    ``num_boxes_reduce`` lets a distributed run average the box count (and the class weights'
    sum) over processes, so that every process normalises its losses by the same numbers.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, eos_coef: float = 0.1,
                 weights: dict[str, float] | None = None,
                 num_boxes_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, **(weights or {})}
        self.num_boxes_reduce = num_boxes_reduce
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self._total_weights: dict[tuple, Tensor] = {}  # per loss keys, device and dtype: made once

    def loss_labels(self, logits: Tensor, classes: Tensor) -> Tensor:
        """Cross-entropy per layer over all queries: ``logits`` ``(L, B, Q, K+1)``, ``classes``
        ``(L, B, Q)`` (unmatched queries are "no object", class K) -> ``(L,)``, each the weighted
        mean over its layer (``F.cross_entropy``'s weighted mean, layer by layer). In a distributed
        run the weights are summed over every process's images, so that N processes give the
        gradient of one process holding the whole batch, whatever the boxes per image."""
        nll = F.cross_entropy(logits.float().flatten(0, 2), classes.flatten(), self.empty_weight, reduction="none")
        weight = self.empty_weight[classes].sum((1, 2))
        if self.num_boxes_reduce is not None:  # the mean over processes, as DDP averages gradients
            weight = self.num_boxes_reduce(weight)
        return nll.view(classes.shape).sum((1, 2)) / weight

    def loss_boxes(self, pred: Tensor, tgt: Tensor, num_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """L1 on ``cxcywh`` and ``1 - GIoU`` of matched pairs ``(L, P, 4)``, summed per layer and
        divided by ``num_boxes`` -> two ``(L,)``."""
        pred, tgt = pred.float(), tgt.to(pred.device, torch.float32)
        l1 = (pred - tgt).abs().sum((1, 2)) / num_boxes
        giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy").flatten(0, 1),
                                        box_convert(tgt, "cxcywh", "xyxy").flatten(0, 1), reduction="none")
        return l1, giou.view(pred.shape[:2]).sum(1) / num_boxes

    def forward(self, outputs: dict, targets: Targets) -> dict[str, Tensor]:
        """``targets``: per image ``labels`` ``(M,)`` and normalised ``cxcywh`` ``boxes`` ``(M, 4)``.

        Every decoder layer is matched and scored in one batch (stacked ``(L, B, Q, .)``): one
        copy to the host for the matching, one back with everything the host knows (the pairs,
        the box counts), and a few kernels for the losses, whatever the depth; nothing after the
        matching waits for the device."""
        layers = [*outputs.get("aux_outputs", []), outputs]  # decoder order; the last is the output
        logits = torch.stack([o["pred_logits"] for o in layers]).float()  # (L, B, Q, K+1)
        boxes = torch.stack([o["pred_boxes"] for o in layers]).float()  # (L, B, Q, 4)
        (L, B), device = logits.shape[:2], logits.device
        sizes = [len(t["labels"]) for t in targets]
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)
        pairs = self.matcher.assign(logits, boxes, labels, tgt_boxes, sizes)  # (4, L * P) on the host
        host = torch.from_numpy(np.concatenate([pairs.ravel(), np.asarray(sizes, dtype=np.int64)]))
        host = host.to(device, non_blocking=True)
        layer, b, src, dst = host[:-B].view(4, -1)
        counts = host[-B:].float()  # (B,) boxes per image
        num_boxes = counts.sum()
        if self.num_boxes_reduce is not None:
            num_boxes = self.num_boxes_reduce(num_boxes)
        num_boxes = num_boxes.clamp(min=1.0)
        classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.long, device=device)
        classes[layer, b, src] = labels[dst]
        ce = self.loss_labels(logits, classes)
        l1, giou = self.loss_boxes(boxes[layer, b, src].view(L, -1, 4), tgt_boxes[dst].view(L, -1, 4), num_boxes)
        # the output first, then auxiliary layer i; one tensor unbound, so backward gathers one gradient
        terms = torch.stack([ce, l1, giou], 1).roll(1, 0).flatten().unbind()
        suffixes = ["", *(f"_{i}" for i in range(L - 1))]
        names = [f"{k}{suffix}" for suffix in suffixes for k in ("loss_ce", "loss_bbox", "loss_giou")]
        losses = dict(zip(names, terms))
        losses["cardinality_error"] = self.cardinality_error(logits[-1], counts)
        return losses

    @torch.no_grad()
    def cardinality_error(self, logits: Tensor, counts: Tensor) -> Tensor:
        """Mean absolute difference between the number of non-"no object" predictions (``logits``
        ``(B, Q, K+1)``) and of boxes (``counts`` ``(B,)``)."""
        pred = (logits.argmax(-1) != self.num_classes).sum(1).float()
        return (pred - counts).abs().mean()

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of every loss term (auxiliary ones with their base weight), as one
        product of the stacked terms with their weights (two kernels, not two per term)."""
        keys = tuple(k for k in losses if k.startswith("loss_"))
        values = torch.stack([losses[k] for k in keys])
        key = (keys, values.device, values.dtype)
        if key not in self._total_weights:
            w = [self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k in keys]
            self._total_weights[key] = torch.tensor(w, dtype=values.dtype, device=values.device)
        return values @ self._total_weights[key]


__all__ = ["SetCriterion"]
