"""Hungarian matching of DETR's predictions to ground-truth boxes (scipy's ``linear_sum_assignment``)."""
from __future__ import annotations

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
        per layer, per image ``(prediction indices, target indices)`` on the CPU.

        One cost matrix for all layers and images and one copy to the host: a copy waits for the
        device to finish the forward pass, so one per layer would stall it once per layer."""
        L, B, Q = logits.shape[:3]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.long)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in range(B)] for _ in range(L)]
        cost = self.cost_matrix(logits.flatten(0, 2), boxes.flatten(0, 2),
                                torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))
        cost = cost.view(L, B, Q, -1).cpu()
        out = []
        for layer in cost:
            pairs = []
            for i, c in enumerate(layer.split(sizes, -1)):
                rows, cols = linear_sum_assignment(c[i].numpy())
                pairs.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            out.append(pairs)
        return out

__all__ = ["HungarianMatcher"]
