"""
The Image Transformer: the flat prior's decoder-only Transformer over raw subpixels instead of
tokenizer ids, with local attention. One causal sequence, the caption then the image's 3*H*W
subpixels in raster order over (row, col, channel) (tessera/nn/subpixels.py):

    position  0 .. T-1     | T      T+1    T+2    T+3    ...  T+3HW-2
    input     caption      | R_0    G_0    B_0    R_1    ...  (each a value in [0, 255],
    predicts  ... R_0      | G_0    B_0    R_1    G_1    ...   + row, column and channel embeddings)

Every image query attends to the whole caption and to the `window` positions up to its own (a
banded causal mask); caption queries are causal among the caption. So the caption conditions every
subpixel however far down the image, and a step's attention costs T + window keys, not the whole
sequence: the 24 + 3,072 positions of a 32 px image would be 9.5M scores per head and layer, the
banded ones ~0.8M. Training computes it in chunks of `window` queries, each against the caption
and the chunk before and its own; sampling keeps a rolling cache of the caption and the last
`window` positions (`LocalKVCache`), so its memory does not grow with the image either.

Everything else is TextImageTransformer's (tessera/nn/transformer.py): the blocks, the caption
embeddings and head, the loss, prefill and decode_step; the 256 subpixel values are the image
vocabulary and `image_grid` is the image's side in pixels.

References:
1) Image Transformer, Parmar et al. 2018: https://arxiv.org/abs/1802.05751 (subpixels as tokens
   with channel and position embeddings, local 1D attention, 2.90 bits/dim on CIFAR-10)
2) Generating Long Sequences with Sparse Transformers, Child et al. 2019:
   https://arxiv.org/abs/1904.10509 (banded attention computed in blocks)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.flops import attention_flops
from tessera.nn.subpixels import SUBPIXEL_VALUES, SubpixelSteps, check_subpixels
from tessera.nn.transformer import CausalSelfAttention, KVCache, TextImageTransformer, TransformerConfig


@dataclass
class ImageTransformerConfig(TransformerConfig):
    """Shape of the Image Transformer. TransformerConfig's fields, with `image_grid` the image's
    side in pixels and `image_vocab_size` the 256 values of a subpixel; defaults for 32 px."""

    text_length: int = 24
    image_vocab_size: int = SUBPIXEL_VALUES
    image_grid: int = 32
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    window: int = 256
    """Image positions each image query attends to, its own included (Parmar et al.: 256 for 32 px)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_vocab_size != SUBPIXEL_VALUES:
            raise ValueError(f"image_vocab_size is the 256 values of a subpixel, got {self.image_vocab_size}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def image_length(self) -> int:
        """Subpixels per image."""
        return 3 * self.image_grid**2


class LocalSelfAttention(CausalSelfAttention):
    """Causal attention over the caption, local for the image (module docstring)."""

    def __init__(self, config: ImageTransformerConfig):
        super().__init__(config)
        self.text_length, self.window = config.text_length, config.window

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """With a mask (a cached step: `LocalKVCache.attention_mask`) as the flat prior; without
        one, the banded causal attention over the whole sequence, in chunks of `window` queries."""
        T, W = self.text_length, self.window
        n = q.size(2) - T  # image positions
        if attn_mask is not None or n <= W:  # a cached step, or every image position within one window
            return super().attention(q, k, v, attn_mask)
        dropout = self.dropout if self.training else 0.0
        y_text = F.scaled_dot_product_attention(q[:, :, :T], k[:, :, :T], v[:, :, :T], dropout_p=dropout, is_causal=True)
        chunks = -(-n // W)
        pad = chunks * W - n
        queries = F.pad(q[:, :, T:], (0, 0, 0, pad)).unflatten(2, (chunks, W))  # (B, nh, c, W, hs)

        def chunk_keys(x: torch.Tensor) -> torch.Tensor:
            """(B, nh, T + n, hs) -> per chunk the caption, the chunk before and its own: (B, nh, c, T + 2W, hs)."""
            image = F.pad(x[:, :, T:], (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2)  # (B, nh, c, 2W, hs)
            caption = x[:, :, None, :T].expand(-1, -1, chunks, -1, -1)  # (B, nh, c, T, hs)
            return torch.cat([caption, image], dim=3)

        starts = torch.arange(chunks, device=q.device)[:, None, None] * W  # (c, 1, 1)
        query_pos = starts + torch.arange(W, device=q.device)[None, :, None]  # (c, W, 1): image index
        key_pos = starts - W + torch.arange(2 * W, device=q.device)[None, None, :]  # (c, 1, 2W)
        local = (key_pos >= 0) & (key_pos <= query_pos) & (query_pos - key_pos < W)  # (c, W, 2W)
        mask = torch.cat([local.new_ones(chunks, W, T), local], dim=-1)  # (c, W, T + 2W)
        y = F.scaled_dot_product_attention(queries, chunk_keys(k), chunk_keys(v), attn_mask=mask, dropout_p=dropout)
        return torch.cat([y_text, y.flatten(2, 3)[:, :, :n]], dim=2)  # (B, nh, T + n, hs)


class LocalKVCache(KVCache):
    """Keys and values of the caption and of the last `window` image positions: slots 0 .. T-1 hold
    the caption, and image position p (>= T) goes to slot T + (p - T) mod window, over the position
    that just left the window. `slot_positions` records which sequence position each slot holds."""

    def __init__(self, config: ImageTransformerConfig, batch_size: int, device=None, dtype: torch.dtype = torch.float32):
        self.text_length, self.window = config.text_length, config.window
        self.span = min(config.window, config.image_length)
        super().__init__(config, batch_size, device, dtype, length=config.text_length + self.span)
        self.slot_positions = torch.full((config.text_length + self.span,), -1, device=device)  # -1: empty
        torch._dynamo.mark_static_address(self.slot_positions)

    def slots(self, input_pos: torch.Tensor) -> torch.Tensor:
        """The slots of sequence positions `input_pos` (T,), recorded as theirs from now on."""
        T = self.text_length
        slots = torch.where(input_pos < T, input_pos, T + (input_pos - T) % self.span)
        self.slot_positions.index_copy_(0, slots, input_pos)
        return slots

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(T, slots) additive mask: 0 where query position q may see the slot's position p (p <= q,
        and p in the caption or within the window), -inf elsewhere and on empty slots."""
        held, query = self.slot_positions[None, :], input_pos[:, None]
        visible = (held >= 0) & (held <= query) & ((held < self.text_length) | (query - held < self.window))
        blocked = torch.full(visible.shape, float("-inf"), device=visible.device, dtype=self.k[0].dtype)
        return blocked.masked_fill(visible, 0.0)


class ImageTransformer(TextImageTransformer):
    """Caption ids (B, text_length) and subpixels (B, N) in raster order, or images (B, H, W, 3) ->
    the caption's logits and those of every subpixel (B, N, 256)."""

    attention_class = LocalSelfAttention
    kv_cache_class = LocalKVCache

    def __init__(self, config: ImageTransformerConfig, text_head: bool = True):
        super().__init__(config, text_head)
        self.image_channel = nn.Embedding(3, config.n_embd)
        self._init_weights(self.image_channel)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = super().num_params(exclude_embeddings)
        return n - self.image_channel.weight.numel() if exclude_embeddings else n

    def flops_per_sequence(self) -> int:
        """TextImageTransformer's count with each query's attention over at most T + window keys."""
        c = self.config
        positions = c.sequence_length - 1
        full = attention_flops(c.n_layer, c.n_embd, positions)
        return super().flops_per_sequence() - full + full * min(positions, c.text_length + c.window) // positions

    def _embed_image(self, image_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Subpixel values (B, n) at subpixel indices `index` (n,) -> (B, n, C), with the row, column
        and channel of each."""
        pixel, channel = index // 3, index % 3
        grid = self.config.image_grid
        return self.image_embed(image_ids) + self.image_row(pixel // grid) + self.image_col(pixel % grid) + self.image_channel(channel)

    def _flat_image_ids(self, image_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, N) subpixels in raster order with 1 <= N <= 3*H*W, or whole images (B, H, W, 3) or (B, H*W, 3)."""
        grid = self.config.image_grid
        if image_ids.dim() in (3, 4) and image_ids.size(0) == batch_size:
            return check_subpixels(image_ids, grid).flatten(1)
        if image_ids.dim() != 2 or image_ids.size(0) != batch_size or not 1 <= image_ids.size(1) <= self.config.image_length:
            raise ValueError(
                f"image_ids must be (B={batch_size}, N) subpixels with 1 <= N <= {self.config.image_length}, "
                f"or images (B, {grid}, {grid}, 3); got {tuple(image_ids.shape)}"
            )
        return image_ids

    def _blocks_cached(self, x: torch.Tensor, cache: LocalKVCache, input_pos: torch.Tensor) -> torch.Tensor:
        """TextImageTransformer's, with each position written to its slot of the rolling cache."""
        if x.size(0) != cache.batch_size:
            raise ValueError(f"batch of {x.size(0)} rows for a cache made for {cache.batch_size}")
        slots = cache.slots(input_pos)
        attn_mask = cache.attention_mask(input_pos)  # (T, slots)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i), slots, attn_mask)
        return self.ln_f(x)

    # --- likelihood (tessera/nn/subpixels.py) ----------------------------------------------------

    @torch.no_grad()
    def subpixel_log_probs(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forced, one pass: images (B, H, W, 3) in [0, 255] -> (B, H, W, 3, 256) fp32
        log-probabilities of every subpixel given the caption and the subpixels before it."""
        images = check_subpixels(images, self.config.image_grid)
        _, logits = self(text_ids, images)  # (B, 3HW, padded vocabulary)
        return logits[..., :SUBPIXEL_VALUES].float().log_softmax(dim=-1).view(*images.shape, SUBPIXEL_VALUES)

    def subpixel_steps(self, text_ids: torch.Tensor, use_cache: bool = True) -> ImageTransformerSteps:
        """Step by step: one token through the rolling KV cache a subpixel; `use_cache=False` reruns
        the whole growing sequence every step instead (the slow reference)."""
        return ImageTransformerSteps(self, text_ids, use_cache)


class ImageTransformerSteps(SubpixelSteps):
    """Subpixel i's logits from `decode_step` of subpixel i - 1 (from `prefill` for subpixel 0)."""

    def __init__(self, network: ImageTransformer, text_ids: torch.Tensor, use_cache: bool):
        device = next(network.parameters()).device
        super().__init__(text_ids.size(0), network.config.image_grid, device)
        self.network, self.text_ids = network, text_ids.to(device)
        self.cache = network.make_kv_cache(text_ids.size(0)) if use_cache else None
        self._logits = network.prefill(self.text_ids, self.cache) if use_cache else None  # (B, padded vocabulary)
        self._positions = torch.arange(network.config.sequence_length, device=device)  # made once: no copy a step

    def _log_probs(self) -> torch.Tensor:
        if self.cache is not None:
            return self._logits[:, :SUBPIXEL_VALUES]
        # the subpixel at `index` is a placeholder: forward never feeds the last one, it predicts it
        image_ids = self.values[:, : self.index + 1] if self.index > 0 else None
        return self.network(self.text_ids, image_ids)[1][:, -1, :SUBPIXEL_VALUES]

    def _pushed(self, index: int) -> None:
        if self.cache is not None and index + 1 < self.length:  # the last subpixel is never an input
            position = self._positions[self.network.config.text_length + index]
            self._logits = self.network.decode_step(self.values[:, index], position, self.cache)
