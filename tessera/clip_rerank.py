"""
CLIP reranking and scoring: how well each image matches its caption.

minDALL-E and DALL-E draw many candidates per caption and keep those CLIP ranks best; the same
cosine similarity is the CLIP score of evaluation. The model is an open_clip architecture with
weights from a local file (open_clip's `pretrained=<path>`), never a download.

References:
1) Learning Transferable Visual Models From Natural Language Supervision (CLIP), Radford et al. 2021:
https://arxiv.org/abs/2103.00020
2) open_clip: https://github.com/mlfoundations/open_clip
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F


def check_clip_weights(model_name: str, pretrained: str | Path | None) -> None:
    """A missing CLIP weights file: one error naming it and where such files come from."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"CLIP weights {pretrained} not found: download the {model_name} checkpoint (open_clip's "
            "pretrained files, e.g. from the Hugging Face hub repo laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
            "or OpenAI's ViT-B-32.pt) on a machine with internet and pass its local path"
        )


class ClipScorer:
    """Cosine similarity of (B, 3, H, W) images in [-1, 1] and B captions, with an open_clip model.

    model_name: an open_clip architecture. OpenAI's released weights need quick-GELU:
    "ViT-B-32-quickgelu" (the default) or "ViT-L-14-quickgelu".
    pretrained: the weights file (e.g. open_clip_pytorch_model.bin of laion/CLIP-ViT-B-32 or
    OpenAI's ViT-B-32.pt); None keeps random weights (tests only).
    """

    def __init__(self, model_name: str = "ViT-B-32-quickgelu", pretrained: str | Path | None = None, device: str | torch.device = "cpu"):
        check_clip_weights(model_name, pretrained)
        self.model_name = model_name
        self.model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained else None, device=device)
        self.model.requires_grad_(False).eval()
        self.tokenize = open_clip.get_tokenizer(model_name)
        config = self.model.visual.preprocess_cfg
        self.image_size = config["size"]
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(B,) cosine similarities in [-1, 1]."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        device = self.mean.device
        pixels = (images.to(device).float().clamp(-1, 1) + 1) / 2  # [0, 1]
        pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        image_features = F.normalize(self.model.encode_image((pixels - self.mean) / self.std), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokenize(captions).to(device)), dim=-1)
        return (image_features * text_features).sum(-1)


def rerank(images: torch.Tensor, prompts: list[str], candidates: int, keep: int, scorer: ClipScorer) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` best of each prompt's `candidates` images.

    images: (P * candidates, 3, H, W), prompt-major (prompt 0's candidates first).
    Returns the kept images (P * keep, 3, H, W), best first per prompt, and their scores (P, keep).
    """
    if not 1 <= keep <= candidates or len(images) != len(prompts) * candidates:
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts x {candidates} candidates, keep {keep}")
    scores = scorer(images, [p for p in prompts for _ in range(candidates)]).view(len(prompts), candidates)
    best_scores, best = scores.topk(keep, dim=1)  # (P, keep)
    chosen = (best + torch.arange(len(prompts), device=best.device)[:, None] * candidates).flatten()
    return images[chosen.to(images.device)], best_scores
