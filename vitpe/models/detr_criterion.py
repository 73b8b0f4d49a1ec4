"""DETR's set criterion: classification with a down-weighted "no object" class, L1 and generalized
IoU on matched boxes, the same on every decoder layer's output (auxiliary losses)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .detr_matcher import HungarianMatcher

Targets = list[dict[str, Tensor]]


class SetCriterion(nn.Module):
    """Losses ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``*_i`` for auxiliary layer ``i``), plus
    ``cardinality_error`` for logging. ``forward`` returns them unweighted; ``total`` weighs them.

    ``num_boxes_reduce`` lets a distributed run average the box count over processes, so that
    every process normalises its box losses by the same number.
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

    def loss_labels(self, logits: Tensor, targets: Targets, indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Cross-entropy over all queries; unmatched queries should predict "no object" (class K)."""
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        b, src = self._flat(indices)
        classes[b, src] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), classes, self.empty_weight)

    def loss_boxes(self, boxes: Tensor, targets: Targets, indices: list[tuple[Tensor, Tensor]],
                   num_boxes: float) -> tuple[Tensor, Tensor]:
        """L1 on ``cxcywh`` and ``1 - GIoU``, summed over matched pairs, divided by ``num_boxes``."""
        b, src = self._flat(indices)
        pred = boxes[b, src].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        l1 = F.l1_loss(pred, tgt, reduction="sum") / num_boxes
        giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                        reduction="sum") / num_boxes
        return l1, giou

    @staticmethod
    def _flat(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    @torch.no_grad()
    def cardinality_error(self, logits: Tensor, targets: Targets) -> Tensor:
        """Mean absolute difference between the number of non-"no object" predictions and of boxes."""
        pred = (logits.argmax(-1) != self.num_classes).sum(1).float()
        true = torch.tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        return (pred - true).abs().mean()

    def _layer(self, out: dict[str, Tensor], targets: Targets, num_boxes: float, suffix: str) -> dict[str, Tensor]:
        indices = self.matcher(out, targets)
        l1, giou = self.loss_boxes(out["pred_boxes"], targets, indices, num_boxes)
        return {f"loss_ce{suffix}": self.loss_labels(out["pred_logits"], targets, indices),
                f"loss_bbox{suffix}": l1, f"loss_giou{suffix}": giou}

    def forward(self, outputs: dict, targets: Targets) -> dict[str, Tensor]:
        """``targets``: per image ``labels`` ``(M,)`` and normalised ``cxcywh`` ``boxes`` ``(M, 4)``."""
        device = outputs["pred_logits"].device
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if self.num_boxes_reduce is not None:
            num_boxes = self.num_boxes_reduce(num_boxes)
        n = max(float(num_boxes), 1.0)
        losses = self._layer(outputs, targets, n, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._layer(aux, targets, n, f"_{i}"))
        losses["cardinality_error"] = self.cardinality_error(outputs["pred_logits"], targets)
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of every loss term (auxiliary ones with their base weight)."""
        return sum(v * self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k]
                   for k, v in losses.items() if k.startswith("loss_"))


__all__ = ["SetCriterion"]
