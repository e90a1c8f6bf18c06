"""
What the pixel-level models (tessera/nn/pixelcnn.py, tessera/nn/image_transformer.py) share: an
image as its 3*H*W subpixels, each one of 256 values, in raster order over (row, col, channel),

    index i = (row * W + col) * 3 + channel          (R, then G, then B within a pixel)

and two ways to get each subpixel's distribution given the ones before it, both log-probabilities
(B, ..., 256) in fp32 (normalised: logsumexp over the 256 values is 0):

- teacher forced, in one pass: `network.subpixel_log_probs(images, text_ids)` -> (B, H, W, 3, 256)
  for images (B, H, W, 3) of integers in [0, 255] (uint8 or long): the likelihood of given images.
- step by step: `steps = network.subpixel_steps(text_ids)`, a `SubpixelSteps`:

      for i in range(steps.length):
          log_probs = steps.log_probs()    # (B, 256): subpixel i given subpixels 0 .. i-1
          value = ...                      # (B,) in [0, 255]: drawn, or the image's own, or decoded
          steps.push(value)

  Sampling draws from it; a lossless coder codes with it. An encoder and a decoder that run this
  same loop, on the same device, dtype, batch size and thread settings, push the same values and
  therefore get bitwise the same `log_probs`, whatever the teacher-forced pass gives (it agrees to
  float rounding only: another kernel order).

The caption is its token ids alone (B, text_length), padding included: the padding is a function
of the caption (CLIP BPE repeats the end token), as in the flat prior, so no mask is needed.
"""

from __future__ import annotations

import math

import torch

SUBPIXEL_VALUES = 256  # uint8


def bits_per_dim(nats: torch.Tensor | float) -> torch.Tensor | float:
    """A mean negative log-likelihood per subpixel in nats -> bits per dimension (uint8 data: 8 is uniform)."""
    return nats / math.log(2)


def check_subpixels(images: torch.Tensor, image_grid: int) -> torch.Tensor:
    """Images as subpixels (B, H, W, 3), or flattened (B, H*W, 3) or (B, 3*H*W), integers in
    [0, 255] -> (B, H, W, 3) long; a clear error otherwise."""
    if images.is_floating_point() or images.dtype == torch.bool:
        raise ValueError(f"subpixels must be integers in [0, 255] (uint8 or long), got {images.dtype}")
    shape = (image_grid, image_grid, 3)
    length = 3 * image_grid**2
    if images.dim() < 2 or images[0].numel() != length or images.shape[1:] not in (shape, (image_grid**2, 3), (length,)):
        raise ValueError(
            f"subpixels must be (B, {image_grid}, {image_grid}, 3), (B, {image_grid**2}, 3) or (B, {length}), "
            f"got {tuple(images.shape)}"
        )
    images = images.long().reshape(-1, *shape)
    if images.numel() and (images.min() < 0 or images.max() >= SUBPIXEL_VALUES):
        raise ValueError(f"subpixel values must lie in [0, 255], got [{images.min()}, {images.max()}]")
    return images


class SubpixelSteps:
    """The distribution of each next subpixel given the ones pushed so far, one subpixel at a time
    (module docstring). A network's subclass supplies `_log_probs` (of subpixel `index`, from
    `values[:, :index]`) and may keep state in `_pushed`; this class keeps the order and checks."""

    def __init__(self, batch_size: int, image_grid: int, device: torch.device):
        self.length = 3 * image_grid**2
        self.index = 0  # the subpixel whose distribution `log_probs` gives next
        self.values = torch.zeros(batch_size, self.length, dtype=torch.long, device=device)  # pushed so far, raster order
        self._current: torch.Tensor | None = None

    @torch.no_grad()
    def log_probs(self) -> torch.Tensor:
        """(B, 256) fp32 log-probabilities of subpixel `index` given the values pushed before it."""
        if self.index >= self.length:
            raise ValueError(f"all {self.length} subpixels are pushed: there is no next one")
        if self._current is None:
            self._current = self._log_probs().float().log_softmax(dim=-1)
        return self._current

    @torch.no_grad()
    def push(self, values: torch.Tensor) -> None:
        """Subpixel `index`'s values (B,), integers in [0, 255]; moves to the next subpixel."""
        if self.index >= self.length:
            raise ValueError(f"all {self.length} subpixels are pushed already")
        if values.shape != (self.values.size(0),) or values.is_floating_point():
            raise ValueError(f"push takes ({self.values.size(0)},) integer values, got {values.dtype} {tuple(values.shape)}")
        if values.min() < 0 or values.max() >= SUBPIXEL_VALUES:
            raise ValueError(f"subpixel values must lie in [0, 255], got [{values.min()}, {values.max()}]")
        self.values[:, self.index] = values
        self._pushed(self.index)
        self.index += 1
        self._current = None

    def image(self) -> torch.Tensor:
        """The values pushed so far as images (B, H, W, 3), zeros where none is pushed yet."""
        grid = math.isqrt(self.length // 3)
        return self.values.view(-1, grid, grid, 3)

    def _log_probs(self) -> torch.Tensor:
        raise NotImplementedError

    def _pushed(self, index: int) -> None:
        """Subpixel `index` is now in `values`: a cached network feeds it here."""
