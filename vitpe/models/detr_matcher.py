"""Hungarian matching of DETR's predictions to ground-truth boxes (scipy's ``linear_sum_assignment``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising, per image, the cost
    ``cost_class * (-p(class)) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``.

    Targets are ``{'labels': (M,) long, 'boxes': (M, 4) normalised cxcywh}``; crowd boxes must have
    been left out by the caller (they are never matched). Returns per image a pair of long tensors
    ``(prediction indices, target indices)``, both of length ``min(Q, M)``, sorted by prediction.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """``logits`` ``(N, K+1)``, ``boxes`` ``(N, 4)`` against ``M`` targets -> ``(N, M)``."""
        prob = logits.float().softmax(-1)
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cost = -self.cost_class * prob[:, labels]
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return cost - self.cost_giou * giou

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """One decoder layer's ``pred_logits`` ``(B, Q, K+1)`` and ``pred_boxes`` ``(B, Q, 4)``."""
        return self.match_layers(outputs["pred_logits"][None], outputs["pred_boxes"][None], targets)[0]

    @torch.no_grad()
    def match_layers(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]
                     ) -> list[list[tuple[Tensor, Tensor]]]:
        """Every decoder layer at once: ``logits`` ``(L, B, Q, K+1)``, ``boxes`` ``(L, B, Q, 4)`` ->
        per layer, per image ``(prediction indices, target indices)`` on the CPU (``assign``, split up)."""
        L, B = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        pairs = self.assign(logits, boxes, torch.cat([t["labels"] for t in targets]),
                            torch.cat([t["boxes"] for t in targets]), sizes)
        offsets = np.cumsum([0, *sizes])
        out: list[list[tuple[Tensor, Tensor]]] = []
        for layer in range(L):
            out.append([])
            for b in range(B):
                pick = (pairs[0] == layer) & (pairs[1] == b)
                out[-1].append((torch.as_tensor(pairs[2, pick]), torch.as_tensor(pairs[3, pick] - offsets[b])))
        return out

    @torch.no_grad()
    def assign(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
               sizes: Sequence[int]) -> np.ndarray:
        """Every decoder layer and image at once: ``logits`` ``(L, B, Q, K+1)`` and ``boxes``
        ``(L, B, Q, 4)`` against the batch's targets, concatenated (``labels`` ``(M,)``,
        ``tgt_boxes`` ``(M, 4)``, ``sizes[b]`` of them image ``b``'s) -> ``(4, L * P)`` int64 on the
        host: layer, image, prediction index and index into the concatenated targets of every
        pair, ``P = sum_b min(Q, sizes[b])``; layer-major, then image-major, by prediction index.

        One cost matrix for all layers and images and one copy to the host: a copy waits for the
        device to finish the forward pass, so one per layer would stall it once per layer. Non-finite
        costs (a diverged model) are matched as very large ones, so that the step still ends in a
        loss, whose non-finite value the training loop reports."""
        L, B, Q = logits.shape[:3]
        if not len(labels):
            return np.zeros((4, 0), dtype=np.int64)
        cost = self.cost_matrix(logits.flatten(0, 2), boxes.flatten(0, 2), labels, tgt_boxes)
        cost = cost.view(L, B, Q, -1).cpu().numpy()
        if not np.isfinite(cost).all():
            cost = np.nan_to_num(cost, nan=1e30, posinf=1e30, neginf=-1e30)
        offsets = np.cumsum([0, *sizes])
        cols = []
        for layer in range(L):
            for b in range(B):
                lo, hi = offsets[b], offsets[b + 1]
                if hi > lo:
                    src, dst = linear_sum_assignment(cost[layer, b, :, lo:hi])
                    cols.append(np.stack([np.full_like(src, layer), np.full_like(src, b), src, dst + lo]))
        return np.concatenate(cols, 1).astype(np.int64)


__all__ = ["HungarianMatcher"]
