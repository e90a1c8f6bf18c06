"""
The RQ-Transformer: a stage-2 prior over the (h, w, D) ids of a residual tokenizer, a spatial
transformer over the caption then the h*w image positions, and a small depth transformer that
draws the D codes of each position one after another.

    spatial transformer, causal, one step per caption token or image position (N = h*w):
    position   0 .. T-2        T-1                    T        ...  T+N-2
    input      caption         last caption token     u_0      ...  u_{N-2}     u_t = sum_d e(k_{t,d}) + row + col
    output     text logits     h_0                    h_1      ...  h_{N-1}     h_t: the context of position t

    depth transformer, causal, at every position t at once (as a batch of B*N sequences of D):
    step       0          1             2                        ...  D-1
    input      h_t        e(k_{t,0})    e(k_{t,0}) + e(k_{t,1})  ...  e(k_{t,0}) + ... + e(k_{t,D-2})   (+ depth position)
    predicts   k_{t,0}    k_{t,1}       k_{t,2}                  ...  k_{t,D-1}

The context of position t comes from positions before it only: the last caption token plays the
start-of-image token for position 0 (as in the reference and in the flat prior), so the caption
and every image position share one causal stack and one KV cache. The spatial steps cost
T + N - 1 positions instead of the flat prior's T + N*D - 1 over the same ids: an 8x8x4 code
is 64 spatial steps, where a 16x16 grid of as many ids is 256.

References:
1) Autoregressive Image Generation using Residual Quantization (RQ-VAE and RQ-Transformer),
   Lee et al. 2022: https://arxiv.org/abs/2203.01941
   https://github.com/kakaobrain/rq-vae-transformer/blob/main/rqvae/models/rqtransformer/transformers.py
   (the summed codes as spatial input, the depth input as the running sum of the codes so far,
   depth positions on every step, one classifier shared by all depths)
2) nanoGPT, Karpathy: https://github.com/karpathy/nanoGPT/blob/master/model.py (the blocks)

Choices:
- One learned embedding table for the codes of every depth, as the tokenizer has one codebook for
  every depth; the spatial input sums a position's D embeddings and the depth input their running
  sum, as the tokenizer's z_q sums a position's codes. The reference maps the frozen RQ-VAE
  codebook through a linear layer instead; a learned table keeps the prior free of the tokenizer's
  weights (exports load without it) and is the flat prior's image embedding.
- The caption, the positions, the text head, the final norm, `Block` and `KVCache` are the flat
  prior's (TextImageTransformer is the parent); the image head is the classifier of every depth,
  after the depth transformer's own norm.
- Sampling steps the depth transformer through a KV cache of its own, D slots long and reused at
  every position: D token passes through its blocks a position (16 block passes with the 654M
  shape's 4 depth layers, against the spatial step's 26).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tessera.flops import attention_flops, matmul_flops
from tessera.nn.transformer import Block, KVCache, TextImageTransformer, TransformerConfig, norm_layer


@dataclass
class RQTransformerConfig(TransformerConfig):
    """Shape of the RQ-Transformer. The fields of TransformerConfig describe the caption and the
    spatial transformer (`image_grid` is the side of the grid of positions, `image_vocab_size` the
    codebook size shared by all depths); the depth transformer has the same width and heads."""

    code_depth: int = 4
    """Codes per position: the residual tokenizer's depth D."""
    depth_n_layer: int = 4
    """Blocks of the depth transformer (the paper's 654M prior: 4, its 1.4B: 6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("code_depth", "depth_n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def image_tokens(self) -> int:
        """Ids per image: positions times depth."""
        return self.image_length * self.code_depth


class RQTransformer(TextImageTransformer):
    """Caption ids (B, text_length) and image ids (B, N, D) or (B, h, w, D) -> text logits and the
    logits of every code (B, N, D, padded_image_vocab_size)."""

    def __init__(self, config: RQTransformerConfig, text_head: bool = True):
        super().__init__(config, text_head)
        d = config.n_embd
        self.depth_pos = nn.Embedding(config.code_depth, d)
        self.depth_blocks = nn.ModuleList([Block(config) for _ in range(config.depth_n_layer)])
        self.depth_ln = norm_layer(config)
        for module in (self.depth_pos, self.depth_blocks, self.depth_ln):
            module.apply(self._init_weights)
        # GPT-2's scaled residual projections, by the depth of the stack each block is in
        for name, param in self.depth_blocks.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.depth_n_layer))

    # --- sizes -------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = super().num_params(exclude_embeddings)
        return n - self.depth_pos.weight.numel() if exclude_embeddings else n

    def flops_per_sequence(self) -> int:
        """Training FLOPs of one caption-image pair as `loss` runs it: the spatial transformer's
        (the flat prior's count at N image positions, whose image head does not run there), plus
        the depth blocks and the image head at the N*D codes, attention over the D steps."""
        c = self.config
        spatial = super().flops_per_sequence() - matmul_flops(self.image_head.weight.numel(), c.image_length)
        weights = sum(m.weight.numel() for m in self.depth_blocks.modules() if isinstance(m, nn.Linear))
        depth = c.image_length * (matmul_flops(weights, c.code_depth) + attention_flops(c.depth_n_layer, c.n_embd, c.code_depth))
        return spatial + depth + matmul_flops(self.image_head.weight.numel(), c.image_tokens)

    # --- training ----------------------------------------------------------------------------

    def _embed_image(self, image_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """image_ids (B, n, D) at image positions `index` (n,) -> spatial inputs (B, n, C): the sum
        of each position's D code embeddings, plus its row and column."""
        grid = self.config.image_grid
        return self.image_embed(image_ids).sum(dim=2) + self.image_row(index // grid) + self.image_col(index % grid)

    def _flat_image_ids(self, image_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, N, D), or the tokenizer's (B, grid, grid, D) with positions flattened row-major."""
        c = self.config
        grid, depth = c.image_grid, c.code_depth
        if image_ids.dim() == 4 and image_ids.shape[1:] == (grid, grid, depth):
            image_ids = image_ids.flatten(1, 2)
        if image_ids.shape != (batch_size, c.image_length, depth):
            raise ValueError(
                f"image_ids must be (B={batch_size}, image_length={c.image_length}, code_depth={depth}) "
                f"or (B, {grid}, {grid}, {depth}); got {tuple(image_ids.shape)}"
            )
        return image_ids

    def image_logits(self, context: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
        """The spatial contexts of the N positions (B, N, C) and their ids (B, N, D) -> the logits of
        every code (B, N, D, padded_image_vocab_size), the depth transformer run at all positions."""
        if image_ids is None:
            raise ValueError("the RQ-Transformer's logits need the image ids: its depth steps read the codes")
        B, N, D = self._flat_image_ids(image_ids, context.size(0)).shape
        codes = image_ids.reshape(B * N, D)[:, :-1]  # the last code of a position is only a target
        x = self._depth_inputs(context.reshape(B * N, -1), codes)  # (B*N, D, C)
        return self.image_head(self._run_depth(x)).view(B, N, D, -1)

    def _depth_inputs(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """context (M, C) and the first d codes of each position (M, d) -> depth inputs (M, d + 1, C):
        the context, then the running sums of the codes' embeddings, each plus its depth position."""
        partial_sums = self.image_embed(codes).cumsum(dim=1)  # (M, d, C)
        x = torch.cat([context[:, None], partial_sums.to(context.dtype)], dim=1)  # (M, d + 1, C)
        return self.drop(x + self.depth_pos(torch.arange(x.size(1), device=x.device)))

    def _run_depth(self, x: torch.Tensor) -> torch.Tensor:
        """(M, d, C) through the causal depth blocks and their final norm."""
        for block in self.depth_blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.depth_ln(x)

    # --- incremental decoding for sampling ---------------------------------------------------
    # The spatial steps keep the flat prior's names and cache, but give the context of the next
    # position, not logits: `depth_step` turns a context and the codes drawn so far into those.

    @torch.no_grad()
    def prefill(self, text_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs the caption (B, text_length) into a cache (positions 0 .. T-1) and returns the context
        of image position 0: (B, C)."""
        self._check_text(text_ids)
        input_pos = torch.arange(text_ids.size(1), device=text_ids.device)
        return self._blocks_cached(self._embed_text(text_ids), cache, input_pos)[:, -1]  # (B, C)

    @torch.no_grad()
    def decode_step(self, image_ids: torch.Tensor, position: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feeds the D codes of one image position per row, image_ids (B, D), at sequence `position`
        (text_length + t for image position t) and returns the context of position t + 1: (B, C)."""
        input_pos = torch.as_tensor(position, device=image_ids.device).view(1)
        x = self._embed_image(image_ids[:, None], input_pos - self.config.text_length)  # (B, 1, C)
        return self._blocks_cached(x, cache, input_pos)[:, -1]  # (B, C)

    def make_depth_cache(self, batch_size: int) -> KVCache:
        """Keys and values of the depth blocks over the D steps of one position, reused at every
        position: step d overwrites slot d and attends to slots 0 .. d only."""
        return self.make_kv_cache(batch_size, n_layer=self.config.depth_n_layer, length=self.config.code_depth)

    @torch.no_grad()
    def depth_step(self, context: torch.Tensor, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A position's context (B, C) and its first d codes (B, d), d < code_depth, steps 0 .. d - 1
        already in `cache` -> the logits of code d: (B, padded_image_vocab_size)."""
        d = codes.size(1)
        x = self._depth_inputs(context, codes)[:, d:]  # (B, 1, C): step d's input alone
        input_pos = torch.tensor([d], device=x.device)
        attn_mask = cache.attention_mask(input_pos)  # (1, code_depth)
        for i, block in enumerate(self.depth_blocks):
            x = block(x, cache.layer(i), input_pos, attn_mask)
        return self.image_head(self.depth_ln(x)[:, -1])
