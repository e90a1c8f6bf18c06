"""
CLIP score: how well generated images match their captions, under the two conventions in use.

- `clip_cosine`: the mean raw cosine of CLIP image and caption embeddings (minDALL-E and
  RQ-Transformer report 0.26 on CC3M with ViT-B/32; GigaGAN and LlamaGen prefix the captions
  with "A photo depicts ").
- `clip_score`: torchmetrics' CLIPScore, the mean of 100 * max(cos, 0) (usually with ViT-L/14).
(Hessel et al.'s CLIPScore is 2.5 * max(cos, 0); it is `clip_score` / 40.)

The cosines come from `tessera.clip_rerank.ClipScorer` (open_clip, local weights file); `ClipScore`
sums them in float64 across batches and ranks (a torchmetrics Metric, synced in `compute`).

References:
1) CLIPScore: A Reference-free Evaluation Metric for Image Captioning, Hessel et al. 2021:
https://arxiv.org/abs/2104.08718
2) torchmetrics CLIPScore: https://lightning.ai/docs/torchmetrics/stable/multimodal/clip_score.html
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

CONVENTIONS = {
    "clip_cosine": "mean cosine of CLIP image and caption embeddings (minDALL-E, RQ-Transformer)",
    "clip_score": "mean of 100 * max(cosine, 0) (torchmetrics CLIPScore)",
}
# GigaGAN's and LlamaGen's caption prefix for the CLIP text encoder
PHOTO_PREFIX = "A photo depicts "


def cosine_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(B,) cosines of paired (B, D) embeddings, in float64."""
    return (F.normalize(image_features.double(), dim=-1) * F.normalize(text_features.double(), dim=-1)).sum(-1)


def clip_scores(cosines: torch.Tensor) -> dict[str, float]:
    """Both conventions of a batch of cosines (see CONVENTIONS)."""
    cosines = cosines.double()
    return {"clip_cosine": float(cosines.mean()), "clip_score": float(100 * cosines.clamp_min(0).mean())}


def with_prefix(captions: list[str], prefix: str = "") -> list[str]:
    return [prefix + caption for caption in captions]


class ClipScore(Metric):
    """Accumulates cosines; compute() gives {"clip_cosine", "clip_score", "count"} over all ranks."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("cosine_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("clipped_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, cosines: torch.Tensor) -> None:
        cosines = cosines.detach().double().flatten().to(self.cosine_sum.device)
        self.cosine_sum += cosines.sum()
        self.clipped_sum += cosines.clamp_min(0).sum()
        self.count += cosines.numel()

    def compute(self) -> dict[str, float]:
        count = int(self.count)
        if count == 0:
            raise RuntimeError("ClipScore has no images")
        return {"clip_cosine": float(self.cosine_sum / count), "clip_score": float(100 * self.clipped_sum / count), "count": count}
