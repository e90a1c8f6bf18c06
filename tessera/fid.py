"""
Frechet Inception Distance: feature statistics, their cache files, and the distance in float64.

FID compares two sets of images by the mean and covariance of a feature network's activations:
    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))
Feature extraction and the running sums come from torchmetrics' `FrechetInceptionDistance`
(float64 sums, synced across ranks by torchmetrics, so every rank extracts features for its own
share); the distance itself is computed here, in float64, from (mean, covariance) pairs, so a
cached reference (`FeatureStats`) and freshly accumulated statistics mix freely.

The standard network is torch-fidelity's port of the TF Inception v3 of 2015-12-05 (pool3, 2048
features) that torchmetrics wraps, fed uint8 images it resizes to 299 the way TF1 did
(`antialias=False` in torchmetrics; its antialiased default changes FID). Its weights are a local
file, never downloaded; their sha256 goes with every set of statistics (and cache file) made with
them, since the extractor's name alone would be the same for any file, and cached statistics of
other weights are refused. Any nn.Module taking (B, 3, H, W) uint8 to (B, D) features can replace it.

References:
1) GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium, Heusel et al. 2017:
https://arxiv.org/abs/1706.08500
2) torch-fidelity: https://github.com/toshas/torch-fidelity; pytorch-fid: https://github.com/mseitzer/pytorch-fid
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from tessera.precision import strict_fp32

# The same file under torch-fidelity's and pytorch-fid's names (6726825d: the first hex digits of its sha256)
INCEPTION_WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_ID = "inception-v3-compat/pool3-2048/2015-12-05-6726825d/tf1-bilinear-299"


def preprocessing(image_size: int) -> dict:
    """How images are prepared before the feature network; stored with cached statistics."""
    return {"image_size": image_size, "resize": "shorter side, PIL bicubic (reducing_gap 3)", "crop": "centre", "pixels": "uint8 RGB"}


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights: `path`, else torch-fidelity's or pytorch-fid's file in $TORCH_HOME/hub/checkpoints."""
    if path is not None:
        candidates = [Path(path)]
    else:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = [cache / name for name in INCEPTION_WEIGHTS_FILES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"FID Inception weights not found at {' or '.join(str(c) for c in candidates)}: this is "
        f"{INCEPTION_WEIGHTS_FILES[0]} (torch-fidelity; the same file as pytorch-fid's {INCEPTION_WEIGHTS_FILES[1]}), "
        f"the TF Inception v3 of 2015-12-05 ported to PyTorch. Download it on a machine with internet from "
        f"{INCEPTION_WEIGHTS_URLS[0]} and pass its path (--inception-weights) or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )


# -----------------------------------------------------------------------------
# statistics and the distance


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D), float64, of `count` images' features, and how they were made."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    extractor: str
    preprocessing: dict = field(default_factory=dict)
    source: str = ""
    weights_sha256: str | None = None
    """sha256 of the extractor's weights file (the Inception's); None for a module given in code."""

    def save(self, path: str | Path) -> Path:
        """Plain tensors, numbers and strings: loads with torch.load(weights_only=True)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"mean": self.mean.double().cpu(), "cov": self.cov.double().cpu(), "count": int(self.count),
                 "extractor": self.extractor, "preprocessing": dict(self.preprocessing), "source": self.source,
                 "weights_sha256": self.weights_sha256}
        partial = path.with_name(path.name + f".partial{os.getpid()}")
        torch.save(state, partial)
        os.replace(partial, path)  # never a half-written cache
        return path

    @classmethod
    def load(cls, path: str | Path, extractor: str | None = None, preprocessing: dict | None = None,
             weights_sha256: str | None = None) -> "FeatureStats":
        """Cached statistics; with `extractor` / `preprocessing` / `weights_sha256`, refused unless they
        were made the same way (a file without a recorded sha256 is refused when one is asked for)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        stats = cls(**state)
        if extractor is not None and stats.extractor != extractor:
            raise ValueError(f"reference statistics {path} were made with extractor {stats.extractor!r}, not {extractor!r}")
        if preprocessing is not None and stats.preprocessing != preprocessing:
            raise ValueError(f"reference statistics {path} were made with preprocessing {stats.preprocessing}, not {preprocessing}")
        if weights_sha256 is not None and stats.weights_sha256 != weights_sha256:
            made_with = stats.weights_sha256 or "not recorded (a file from before weights were hashed)"
            raise ValueError(
                f"reference statistics {path} were made with feature weights of sha256 {made_with}, but the weights "
                f"given now have sha256 {weights_sha256}: pass the weights file they were made with "
                f"(--inception-weights), or delete {path} (or pass another --reference-stats) to compute them with these"
            )
        return stats


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance of two Gaussians, in float64.

    Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the inner matrix is symmetric positive
    semi-definite, so two symmetric eigendecompositions give it stably (no complex parts, no sqrtm).
    """
    if a.extractor != b.extractor:
        raise ValueError(f"statistics of different extractors: {a.extractor!r} and {b.extractor!r}")
    if a.weights_sha256 != b.weights_sha256:
        raise ValueError(f"statistics of different feature weights: sha256 {a.weights_sha256} and {b.weights_sha256}")
    mu_a, mu_b = a.mean.double(), b.mean.double().to(a.mean.device)
    cov_a, cov_b = a.cov.double(), b.cov.double().to(a.cov.device)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T  # S_a^(1/2)
    inner = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID with the standard Inception weights from a local file, or any feature module.

    update(images, real) takes (B, 3, H, W) uint8 and runs with TF32 off. compute() syncs the states
    across ranks (call it on every rank) and returns the float64 distance between the fake
    statistics and `reference` (fixed statistics, e.g. a cache file), or the real ones when there
    is none. `statistics(real)` gives the synced statistics as a `FeatureStats`.

    Args:
        extractor: a module mapping uint8 images to (B, D) features; None is the FID Inception.
        inception_weights: the Inception weights file (see `find_inception_weights`); its sha256 is
            `weights_sha256`, recorded with every statistics this metric makes.
        extractor_id: names the extractor in statistics and cache files (the module's class by default).
        image_size: the side images are prepared at, recorded with the statistics.
        reference: fixed reference statistics; then only fake images may be added.
    """

    def __init__(
        self,
        extractor: nn.Module | None = None,
        inception_weights: str | Path | None = None,
        extractor_id: str | None = None,
        image_size: int = 256,
        reference: FeatureStats | None = None,
        **kwargs,
    ):
        if extractor is None:
            weights = find_inception_weights(inception_weights)  # before torchmetrics could download
            super().__init__(feature=2048, feature_extractor_weights_path=str(weights), antialias=False, normalize=False, **kwargs)
            self.extractor_id = extractor_id or INCEPTION_ID
            self.weights_sha256: str | None = sha256(weights)  # the name above is the same whatever file was given
        else:
            super().__init__(feature=extractor.eval().requires_grad_(False), normalize=False, **kwargs)
            self.extractor_id = extractor_id or f"{type(extractor).__module__}.{type(extractor).__qualname__}"
            self.weights_sha256 = None
        self.preprocessing = preprocessing(image_size)
        self.reference: FeatureStats | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference: FeatureStats) -> None:
        if reference.extractor != self.extractor_id:
            raise ValueError(f"reference statistics of extractor {reference.extractor!r}, this metric uses {self.extractor_id!r}")
        if reference.weights_sha256 != self.weights_sha256:
            raise ValueError(f"reference statistics of feature weights sha256 {reference.weights_sha256}, "
                             f"this metric's are {self.weights_sha256}")
        self.reference = reference

    def load_statistics(self, path: str | Path) -> FeatureStats:
        """Statistics `FeatureStats.save` wrote, refused unless made with this metric's extractor, weights and preprocessing."""
        return FeatureStats.load(path, self.extractor_id, self.preprocessing, self.weights_sha256)

    def update(self, images: torch.Tensor, real: bool) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"FID takes (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
        if real and self.reference is not None:
            raise ValueError("this FID has fixed reference statistics: add generated images only (real=False)")
        with strict_fp32():
            super().update(images, real)

    def _statistics(self, real: bool) -> FeatureStats:
        """From this process's states (synced ones inside compute)."""
        prefix = "real" if real else "fake"
        count = int(getattr(self, f"{prefix}_features_num_samples"))
        if count < 2:
            raise RuntimeError(f"FID needs at least 2 {prefix} images, got {count}")
        total, cov_total = getattr(self, f"{prefix}_features_sum"), getattr(self, f"{prefix}_features_cov_sum")
        mean = total / count  # float64
        cov = (cov_total - count * torch.outer(mean, mean)) / (count - 1)
        return FeatureStats(mean, cov, count, self.extractor_id, self.preprocessing, weights_sha256=self.weights_sha256)

    def statistics(self, real: bool = True) -> FeatureStats:
        """The statistics of all ranks' images; a collective: call it on every rank."""
        with self.sync_context():
            return self._statistics(real)

    def compute(self) -> torch.Tensor:
        reference = self.reference if self.reference is not None else self._statistics(real=True)
        return torch.tensor(frechet_distance(reference, self._statistics(real=False)), dtype=torch.float64)


def fid_metric(
    extractor: nn.Module | None = None, inception_weights: str | Path | None = None, extractor_id: str | None = None,
    image_size: int = 256, device: str | torch.device = "cpu",
) -> FrechetDistance:
    return FrechetDistance(extractor, inception_weights, extractor_id, image_size).to(device)


def sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """Of a file's bytes; of a directory (a sharded checkpoint, an export), of its files' relative
    paths and bytes in sorted order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()
