"""
LPIPS perceptual distance over VGG16 features, the perceptual term of the VQ-GAN reconstruction loss.

References:
1) The Unreasonable Effectiveness of Deep Features as a Perceptual Metric, Zhang et al. 2018:
https://arxiv.org/abs/1801.03924
https://github.com/richzhang/PerceptualSimilarity (the lpips package; its v0.1 "lin" weights)
2) Very Deep Convolutional Networks for Large-Scale Image Recognition (VGG16), Simonyan & Zisserman
2014: https://arxiv.org/abs/1409.1556, weights from torchvision.

d(x, y) = sum over 5 VGG16 layers l of mean over positions of w_l . (n(f_l(x)) - n(f_l(y)))^2,
with n() the unit normalisation over channels and w_l >= 0 the learned per-channel "lin" weights.

Two files, never downloaded here (see `lpips_weight_paths`): torchvision's VGG16 and the lpips
package's 7 KB lin layers, which torchmetrics also ships. Frozen and always in eval mode.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
LIN_REPO = "https://github.com/richzhang/PerceptualSimilarity"
# where the lin weights sit inside the packages that ship them, in search order
LIN_IN_PACKAGES = {
    "lpips": Path("weights/v0.1") / LIN_FILE,
    "torchmetrics": Path("functional/image/lpips_models") / LIN_FILE,
}

# torchvision's vgg16().features: conv widths, "M" for max-pool; indices follow torchvision's
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# the ReLUs LPIPS reads (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): features[:4], [4:9], ...
VGG16_TAPS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)


def _package_dir(name: str) -> Path | None:
    """The installed package's folder, found without importing it (torchmetrics imports slowly)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def lpips_weight_paths() -> dict[str, list[Path]]:
    """Where LPIPS looks for its files when given no path, in search order: {"vgg16": [...], "lin": [...]}."""
    lin = []
    for package, relative in LIN_IN_PACKAGES.items():
        package_dir = _package_dir(package)
        if package_dir is not None:
            lin.append(package_dir / relative)
    # torch.hub.get_dir() reads $TORCH_HOME at call time: $TORCH_HOME/hub, else ~/.cache/torch/hub
    return {"vgg16": [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE], "lin": lin}


def _resolve(explicit: str | Path | None, defaults: list[Path]) -> tuple[Path | None, list[Path]]:
    """The first existing file among the explicit path (alone, when given) or the defaults."""
    candidates = [Path(explicit).expanduser()] if explicit is not None else defaults
    return next((p for p in candidates if p.is_file()), None), candidates


class ScalingLayer(nn.Module):
    """[-1, 1] images -> ImageNet-normalised ones: the lpips package's shift and scale, which are
    ImageNet's mean and std rewritten for [-1, 1] input ((mean - 0.5) / 0.5 and std / 0.5)."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """x / ||x|| over channels, in fp32 (eps would vanish in fp16). eps sits inside the sqrt: the
    lpips package's x / (sqrt(sum x^2) + eps) sends 0 * inf = NaN back through the sqrt wherever a
    feature vector is all zero, which ReLU features often are."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """Perceptual distance between (B, 3, H, W) images in [-1, 1] -> (B,) distances, >= 0.

    pretrained=True loads VGG16 from `vgg_weights`, else `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`,
    and the lin layers from `lin_weights`, else the lpips package's or torchmetrics' `vgg.pth`; one
    FileNotFoundError lists whatever is missing. pretrained=False keeps random weights (tests).
    """

    def __init__(
        self,
        vgg_weights: str | Path | None = None,
        lin_weights: str | Path | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        self.scaling = ScalingLayer()
        layers: list[nn.Module] = []
        in_channels = 3
        for spec in VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, spec, kernel_size=3, padding=1), nn.ReLU()]
                in_channels = spec
        starts = (0,) + VGG16_TAPS[:-1]
        self.slices = nn.ModuleList(nn.Sequential(*layers[a:b]) for a, b in zip(starts, VGG16_TAPS))
        # the lpips package wraps each in Sequential(Dropout, Conv2d); dropout is off in eval, so dropped
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        for lin in self.lins:
            # random but non-negative, like trained ones, so that distances stay >= 0
            nn.init.uniform_(lin.weight, 0.0, 2.0 / lin.in_channels)
        if pretrained:
            self._load(vgg_weights, lin_weights)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_weights: str | Path | None, lin_weights: str | Path | None) -> None:
        defaults = lpips_weight_paths()
        vgg_path, vgg_searched = _resolve(vgg_weights, defaults["vgg16"])
        lin_path, lin_searched = _resolve(lin_weights, defaults["lin"])
        missing = []
        if vgg_path is None:
            missing.append(
                f"- VGG16 backbone {VGG16_FILE}: torchvision's ImageNet VGG16 from {VGG16_URL}; "
                f"put it in $TORCH_HOME/hub/checkpoints/ or pass vgg_weights=. "
                f"Searched: {', '.join(map(str, vgg_searched)) or '(nothing)'}"
            )
        if lin_path is None:
            missing.append(
                f"- LPIPS lin layers {LIN_FILE}: the lpips package's lpips/weights/v0.1/{LIN_FILE} from {LIN_REPO} "
                f"(also shipped by torchmetrics as torchmetrics/functional/image/lpips_models/{LIN_FILE}); "
                f"install either package or pass lin_weights=. "
                f"Searched: {', '.join(map(str, lin_searched)) or '(neither lpips nor torchmetrics is installed)'}"
            )
        if missing:
            raise FileNotFoundError("LPIPS(pretrained=True) is missing weight files:\n" + "\n".join(missing))
        self._load_vgg(torch.load(vgg_path, map_location="cpu", weights_only=True), vgg_path)
        self._load_lins(torch.load(lin_path, map_location="cpu", weights_only=True), lin_path)

    def _load_vgg(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """torchvision keys `features.N.weight` -> `slices.k.(N - first index of slice k).weight`;
        the classifier and the layers past relu5_3 are not used."""
        starts = (0,) + VGG16_TAPS[:-1]
        wanted = {}  # our key -> torchvision key
        for k, start in enumerate(starts):
            for name, _ in self.slices[k].named_parameters():
                index, param = name.split(".")
                wanted[f"{k}.{name}"] = f"features.{int(index) + start}.{param}"
        missing = [key for key in wanted.values() if key not in state]
        if missing:
            raise KeyError(f"{path} is not a torchvision VGG16 state dict: it lacks {', '.join(missing)}")
        self.slices.load_state_dict({ours: state[theirs] for ours, theirs in wanted.items()})

    def _load_lins(self, state: dict[str, torch.Tensor], path: Path) -> None:
        """lpips package keys `linK.model.1.weight` (after its Dropout) -> `lins.K.weight`."""
        wanted = {f"{k}.weight": f"lin{k}.model.1.weight" for k in range(len(self.lins))}
        missing = [key for key in wanted.values() if key not in state]
        if missing:
            raise KeyError(f"{path} is not an lpips VGG lin-layer state dict: it lacks {', '.join(missing)}")
        self.lins.load_state_dict({ours: state[theirs] for ours, theirs in wanted.items()})

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode: a parent's .train() must not switch on anything here."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = self.scaling(x), self.scaling(y)
        distance = x.new_zeros(x.shape[0])
        for slice_, lin in zip(self.slices, self.lins):
            h_x, h_y = slice_(h_x), slice_(h_y)  # (B, C_l, H_l, W_l)
            diff = (normalize_channels(h_x) - normalize_channels(h_y)).pow(2)
            # diff is fp32 (normalize_channels); match the lin weights for bf16-true / fp16-true models
            distance = distance + lin(diff.to(lin.weight.dtype)).mean(dim=(1, 2, 3))  # (B, 1, H_l, W_l) -> (B,)
        return distance
