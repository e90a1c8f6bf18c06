"""
The stage-2 prior: a decoder-only Transformer over one causal sequence, the caption's BPE tokens
followed by the image's tokenizer ids, trained with next-token cross-entropy and sampled one
image token at a time with a KV cache.

    position  0    1   2     3    4   ...  T-1 | T      T+1    ...  T+N-1
    input     SOT  a   red   dog  EOT ...  EOT | img_0  img_1  ...  img_{N-1}   (T = text_length,
    predicts  a    red dog   EOT  EOT ...  img_0 img_1  img_2  ...  -             N = image_grid**2)

References:
1) Zero-Shot Text-to-Image Generation (DALL-E), Ramesh et al. 2021: https://arxiv.org/abs/2102.12092
   (text then image tokens in one sequence; the loss weighs text 1/8 and image 7/8)
2) minDALL-E, Kakao Brain 2021: https://github.com/kakaobrain/minDALL-E
   (separate text and image embeddings, positions and heads; the 1.3B shape)
3) nanoGPT, Karpathy: https://github.com/karpathy/nanoGPT/blob/master/model.py
   (the blocks, GPT-2's init, FLOPs per token for MFU, its head included)
4) Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation (LlamaGen), Sun et al.
   2024: https://arxiv.org/abs/2406.06525 (RMSNorm, SwiGLU, a static preallocated KV cache)
5) PaLM, Chowdhery et al. 2022, appendix B: https://arxiv.org/abs/2204.02311 (6N + 12 L d T)

Choices:
- Two vocabularies, two embedding tables, two heads. Text positions predict only text and image
  positions only image ids, so one head over the joint 65,792-way vocabulary would spend three
  quarters of every image position's logits on text tokens that can never be right, and sampling
  would need a mask to keep text out of the picture. With separate heads neither can happen.
- Positions: learned 1D for the caption; for the image a learned row plus a learned column
  embedding, so token i and token i + image_grid start out as known vertical neighbours.
- Caption padding (EOT repeated up to text_length) is an input but never a target: the padding is
  a function of the caption, so attending to it hides nothing, and attention keeps the plain
  `is_causal` fast path (flash on GPU) with no padding mask.
- The heads are padded to a multiple of 64 for efficient matmuls. The padded columns are no
  tokens: the loss and the sampler slice them off, so they are never a target and never drawn.
- A prior trained without caption loss is built without the text head (`text_head=False`): a
  parameter that never gets a gradient fails DDP's next step, and the 49,408-wide head would
  only cost memory and optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tessera.flops import attention_flops, matmul_flops

IGNORE_INDEX = -100  # cross-entropy skips these targets: caption padding


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class TransformerConfig:
    """Shape of the prior. Defaults: GPT-2 small's blocks over 64 CLIP BPE tokens + 16x16 image tokens."""

    text_vocab_size: int = 49408
    """Caption vocabulary: CLIP's BPE, start of text 49406 and end of text 49407 included."""
    text_length: int = 64
    """Caption tokens per sequence, start and end of text and padding included."""
    image_vocab_size: int = 16384
    """Image vocabulary: the tokenizer's codebook size."""
    image_grid: int = 16
    """Side of the tokenizer's latent grid: image_grid ** 2 image tokens per image, row-major."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before every attention, MLP and the heads: GPT-2's LayerNorm or LlamaGen's RMSNorm."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Feed-forward: GPT-2's GELU MLP (hidden 4 x n_embd) or LlamaGen's SwiGLU (hidden ~8/3 x n_embd,
    the same parameter count with three matrices instead of two)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms, as GPT-2; False as LLaMA and LlamaGen."""
    dropout: float = 0.0
    """Dropout on the embeddings, the attention weights and both residual branches; minDALL-E uses none."""
    activation_checkpointing: bool = False
    """Recompute every block's activations in the backward pass (training only): about a third
    more compute, and only each block's input is kept in memory."""

    def __post_init__(self) -> None:
        for name in ("text_vocab_size", "image_vocab_size", "image_grid", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_length < 2:
            raise ValueError(f"text_length must hold at least the start and end tokens (2), got {self.text_length}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: every head needs the same width"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def image_length(self) -> int:
        """Image tokens per sequence."""
        return self.image_grid**2

    @property
    def sequence_length(self) -> int:
        """Text plus image tokens."""
        return self.text_length + self.image_length

    @property
    def padded_text_vocab_size(self) -> int:
        """Width of the text head: the vocabulary rounded up to a multiple of 64 for efficient matmuls."""
        return _round_up(self.text_vocab_size, 64)

    @property
    def padded_image_vocab_size(self) -> int:
        """Width of the image head: the codebook size rounded up to a multiple of 64 for efficient matmuls."""
        return _round_up(self.image_vocab_size, 64)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A preset of `PRESETS`, with any field overridden: `from_name("300m", image_grid=32)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown transformer preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Sizes in the names count the blocks, not the embeddings and heads (49,408 x n_embd twice for text).
PRESETS: dict[str, dict[str, Any]] = {
    # the CPU quickstart on 64 px synthetic shapes: an f8 tokenizer gives an 8x8 grid of 512 codes
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, text_length=32, image_grid=8, image_vocab_size=512),
    # GPT-2 small's shape: 85M without embeddings
    "100m": dict(n_layer=12, n_head=12, n_embd=768),
    # GPT-2 medium's shape: 302M without embeddings, as the transformers reference measured in BENCHMARKS.md
    "300m": dict(n_layer=24, n_head=16, n_embd=1024),
    # minDALL-E: 1.19B without embeddings, ~1.4B with our CLIP-sized text vocabulary
    "1.3b": dict(n_layer=42, n_head=24, n_embd=1536),
}


def norm_layer(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention` (flash on GPU)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C). Without a cache: causal attention among the T tokens. With one (this layer's
        keys and values, each (B, nh, max_len, hs)): the T tokens' keys and values are written at
        `input_pos` (T,) and the queries attend over the whole buffer where `attn_mask`
        (T, max_len) is True, so every decode step has the same shapes."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
            k, v = k_cache, v_cache  # (B, nh, max_len, hs)
        y = self.attention(q, k, v, attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Heads (B, nh, T, hs) and keys, values -> (B, nh, T, hs): causal without a mask, else where
        the mask allows (local attention, tessera/nn/image_transformer.py, replaces the causal case)."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )


class MLP(nn.Module):
    """GPT-2's GELU MLP (hidden 4d) or SwiGLU (hidden 8/3 d rounded up to a multiple of 64)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            # 8/3 d keeps the parameter count of a 4d GELU MLP with a third matrix (LLaMA)
            hidden = _round_up(8 * config.n_embd // 3, 64)
            self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and up in one matmul
        else:
            hidden = 4 * config.n_embd
            self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)). FSDP wraps each one."""

    def __init__(self, config: TransformerConfig, attention: type[CausalSelfAttention] = CausalSelfAttention):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = attention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos, attn_mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for one whole sequence, allocated once: `k` and `v` are
    lists of n_layer tensors (B, n_head, sequence_length, head_dim).

    Static on purpose: a step writes its position in place and attends over the full buffer under
    a mask, so every decode step has the same shapes and memory addresses, which torch.compile
    (mode="reduce-overhead") and CUDA graphs need. Size: 2 x n_layer x B x sequence_length x n_embd
    elements, e.g. 2.6 GB in bf16 for the 1.3B model, 16 prompts doubled for guidance.
    One tensor per layer rather than one for all: a compiled step then writes each in place,
    where a view into a shared input would make Inductor copy the whole cache every step.
    """

    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        n_layer: int | None = None,
        length: int | None = None,
    ):
        """n_layer and length: the config's blocks and sequence_length unless given (the RQ-Transformer's
        depth blocks over the D codes of a position)."""
        n_layer = config.n_layer if n_layer is None else n_layer
        length = config.sequence_length if length is None else length
        shape = (batch_size, config.n_head, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        # compared with the input positions to mask keys not written yet (they hold zeros or stale values)
        self.positions = torch.arange(length, device=device)
        for tensor in (*self.k, *self.v, self.positions):
            # fixed addresses, as transformers' StaticCache: a compiled step (mode="reduce-overhead")
            # then records CUDA graphs that write into these buffers, instead of skipping them
            torch._dynamo.mark_static_address(tensor)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """(T, max_len) additive mask in the cache's dtype, 0 where query t may see a key (those up
        to its own position), -inf elsewhere; made once per step for every layer, where a boolean
        mask would be turned into this by SDPA in each layer again."""
        visible = self.positions[None, :] <= input_pos[:, None]  # (T, max_len)
        blocked = torch.full(visible.shape, float("-inf"), device=visible.device, dtype=self.k[0].dtype)
        return blocked.masked_fill(visible, 0.0)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values, (B, n_head, sequence_length, head_dim) each."""
        return self.k[index], self.v[index]


class TextImageTransformer(nn.Module):
    """Caption ids (B, text_length) and image ids (B, N) -> next-token logits for both; with
    `text_head=False`, for the image ids only (a prior trained without caption loss)."""

    attention_class = CausalSelfAttention  # every block's; the Image Transformer's attends locally
    kv_cache_class = KVCache  # what `make_kv_cache` makes; the Image Transformer's keeps a window

    def __init__(self, config: TransformerConfig, text_head: bool = True):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.text_embed = nn.Embedding(config.text_vocab_size, d)
        self.text_pos = nn.Embedding(config.text_length, d)
        self.image_embed = nn.Embedding(config.image_vocab_size, d)
        self.image_row = nn.Embedding(config.image_grid, d)
        self.image_col = nn.Embedding(config.image_grid, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, self.attention_class) for _ in range(config.n_layer)])
        self.ln_f = norm_layer(config)
        self.text_head = nn.Linear(d, config.padded_text_vocab_size, bias=False) if text_head else None
        self.image_head = nn.Linear(d, config.padded_image_vocab_size, bias=False)

        self.apply(self._init_weights)
        # GPT-2: the projections that write into the residual stream get std 0.02 / sqrt(2 n_layer),
        # so the stream's variance does not grow with the 2 n_layer branches added to it
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- sizes -------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; by default without the embedding tables and the two heads: PaLM's N (its
        head is its shared input embedding), and the 302M of the GPT-2 medium reference in BENCHMARKS.md."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            tables = (self.text_embed, self.text_pos, self.image_embed, self.image_row, self.image_col)
            heads = (head for head in (self.text_head, self.image_head) if head is not None)
            n -= sum(p.numel() for m in (*tables, *heads) for p in m.parameters())
        return n

    def flops_per_sequence(self) -> int:
        """Training FLOPs, forward and backward, of one sequence as `loss` runs it (tessera/flops.py):
        the blocks' matmuls at the T + N - 1 input positions, the text head at the T - 1 caption
        predictions, the image head at the N image ones (both at their padded widths), and
        attention over the T + N - 1 positions. With the text head, the heads are 70% of the tiny
        preset's work, 16% of 100m's and 7% of 300m's."""
        c = self.config
        positions = c.sequence_length - 1  # the last image token is only a target, never an input
        weights = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        flops = matmul_flops(weights, positions) + attention_flops(c.n_layer, c.n_embd, positions)
        if self.text_head is not None:
            flops += matmul_flops(self.text_head.weight.numel(), c.text_length - 1)
        return flops + matmul_flops(self.image_head.weight.numel(), c.image_length)

    def flops_per_token(self) -> float:
        """`flops_per_sequence()` per token of the sequence_length that tokens/s counts, so that
        MFU = tokens/s x flops_per_token() / peak FLOP/s."""
        return self.flops_per_sequence() / self.config.sequence_length

    # --- training ----------------------------------------------------------------------------

    def _embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(text_ids.size(1), device=text_ids.device)
        return self.text_embed(text_ids) + self.text_pos(positions)  # (B, T, C)

    def _embed_image(self, image_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """image_ids (B, n) at image positions `index` (n,) (0 .. image_length - 1, row-major)."""
        grid = self.config.image_grid
        return self.image_embed(image_ids) + self.image_row(index // grid) + self.image_col(index % grid)  # (B, n, C)

    def _check_text(self, text_ids: torch.Tensor) -> None:
        if text_ids.dim() != 2 or text_ids.size(1) != self.config.text_length:
            raise ValueError(
                f"text_ids must be (B, text_length={self.config.text_length}), got {tuple(text_ids.shape)}; "
                f"tokenize captions with CaptionTokenizer(text_length={self.config.text_length})"
            )

    def _flat_image_ids(self, image_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, N), or the tokenizer's (B, grid, grid) flattened row-major, checked against the config."""
        grid = self.config.image_grid
        if image_ids.dim() == 3 and image_ids.shape[1:] == (grid, grid):
            image_ids = image_ids.flatten(1)
        if image_ids.dim() != 2 or image_ids.size(0) != batch_size or not 1 <= image_ids.size(1) <= grid**2:
            raise ValueError(
                f"image_ids must be (B={batch_size}, N) with 1 <= N <= image_length={grid**2}, "
                f"or (B, {grid}, {grid}); got {tuple(image_ids.shape)}"
            )
        return image_ids

    def forward(
        self, text_ids: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Teacher-forced logits over text_ids (B, T) then image_ids (B, N).

        Returns text_logits (B, T - 1, padded_text_vocab_size), the predictions of text tokens
        1 .. T-1 (at positions 0 .. T-2), or None without a text head, and image_logits
        (B, N, padded_image_vocab_size), the predictions of image tokens 0 .. N-1 (at positions
        T-1 .. T+N-2). The last image token is never an input, so N may be anything up to
        image_length; image_ids=None is the same as N = 1: the caption alone, and the logits for
        image token 0.
        """
        x = self.hidden_states(text_ids, image_ids)  # (B, T + N - 1, C)
        T = text_ids.size(1)
        text_logits = self.text_head(x[:, : T - 1]) if self.text_head is not None else None  # (B, T - 1, Vt)
        image_logits = self.image_logits(x[:, T - 1 :], image_ids)  # (B, N, Vi)
        return text_logits, image_logits

    def image_logits(self, context: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
        """The hidden states that predict the image tokens (B, N, C) -> their logits (B, N, Vi).
        The image ids are not needed here; the RQ-Transformer's depth steps read them."""
        return self.image_head(context)

    def hidden_states(self, text_ids: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T + N - 1, C) that `forward` feeds to the heads."""
        self._check_text(text_ids)
        B, T = text_ids.shape
        image_ids = None if image_ids is None else self._flat_image_ids(image_ids, B)
        x = self._embed_text(text_ids)  # (B, T, C)
        if image_ids is not None and image_ids.size(1) > 1:
            index = torch.arange(image_ids.size(1) - 1, device=image_ids.device)
            x = torch.cat([x, self._embed_image(image_ids[:, :-1], index)], dim=1)  # (B, T + N - 1, C)
        x = self.drop(x)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    def loss(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_ids: torch.Tensor,
        text_loss_weight: float = 1.0,
        image_loss_weight: float = 7.0,
        image_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy (in fp32) of the caption and the image.

        text_mask (B, T) is 1 on real caption tokens (start and end of text included): padding
        is never a target. text_loss is the mean over real caption targets, image_loss the mean
        over all image tokens, and loss = (w_t * text_loss + w_i * image_loss) / (w_t + w_i):
        DALL-E's 1/8 : 7/8 by default. With text_loss_weight 0 the text head is skipped (with a
        49,408-token vocabulary it is most of a small model's FLOPs) and text_loss is absent.
        image_targets: distributions over the codebook (..., image_vocab_size), one per image token,
        to take the cross-entropy against instead of the ids (the RQ-Transformer's soft labels).
        """
        if text_loss_weight < 0 or image_loss_weight < 0 or text_loss_weight + image_loss_weight <= 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got text {text_loss_weight}, image {image_loss_weight}"
            )
        if text_loss_weight > 0 and self.text_head is None:
            raise ValueError(
                f"text_loss_weight {text_loss_weight} needs the text head, which this transformer was built "
                "without (text_head=False): pass text_loss_weight=0"
            )
        if text_mask.shape != text_ids.shape:
            raise ValueError(f"text_mask {tuple(text_mask.shape)} must match text_ids {tuple(text_ids.shape)}")
        image_ids = self._flat_image_ids(image_ids, text_ids.size(0))
        x = self.hidden_states(text_ids, image_ids)  # (B, T + N - 1, C)
        return self.head_losses(x, text_ids, text_mask, image_ids, text_loss_weight, image_loss_weight, image_targets)

    def head_losses(
        self,
        x: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_ids: torch.Tensor,
        text_loss_weight: float,
        image_loss_weight: float,
        image_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`loss` from the final hidden states x (B, T + N - 1, C): the heads and their fp32
        cross-entropies. A function of its own so that torch.compile can take it as one graph
        (TextImagePrior's `compile`), in which the fp32 logits are fused into the softmax instead
        of stored: eager, the upcast copies of both heads' logits and their log-softmax are most
        of a step's activation memory (over a GiB at batch 64 for the 300m preset)."""
        T = text_ids.size(1)
        image_logits = self.image_logits(x[:, T - 1 :], image_ids)
        targets = image_ids if image_targets is None else image_targets
        image_loss = _cross_entropy(image_logits, targets, self.config.image_vocab_size)
        if text_loss_weight == 0:
            return {"loss": image_loss, "image_loss": image_loss}
        text_targets = text_ids[:, 1:].masked_fill(~text_mask[:, 1:].bool(), IGNORE_INDEX)  # (B, T - 1)
        text_loss = _cross_entropy(self.text_head(x[:, : T - 1]), text_targets, self.config.text_vocab_size)
        loss = (text_loss_weight * text_loss + image_loss_weight * image_loss) / (text_loss_weight + image_loss_weight)
        return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}

    # --- incremental decoding for sampling ---------------------------------------------------

    def make_kv_cache(self, batch_size: int, dtype: torch.dtype | None = None, **shape: int) -> KVCache:
        """A cache on the model's device, in the dtype its keys and values will have: autocast's
        when autocast is on for that device, else the parameters'. `shape`: KVCache's n_layer, length."""
        param = next(self.parameters())
        if dtype is None:
            device_type = param.device.type
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else param.dtype
        return self.kv_cache_class(self.config, batch_size, param.device, dtype, **shape)

    def _blocks_cached(self, x: torch.Tensor, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) at sequence positions input_pos (T,) through every block, reading and writing the cache."""
        if x.size(0) != cache.batch_size:
            raise ValueError(f"batch of {x.size(0)} rows for a cache made for {cache.batch_size}")
        attn_mask = cache.attention_mask(input_pos)  # (T, max_len)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i), input_pos, attn_mask)
        return self.ln_f(x)

    @torch.no_grad()
    def prefill(self, text_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs the caption (B, text_length) into a cache (positions 0 .. T-1, whatever it held) and
        returns the logits for image token 0: (B, padded_image_vocab_size)."""
        self._check_text(text_ids)
        input_pos = torch.arange(text_ids.size(1), device=text_ids.device)
        x = self._blocks_cached(self._embed_text(text_ids), cache, input_pos)  # (B, T, C)
        return self.image_head(x[:, -1])  # (B, Vi)

    @torch.no_grad()
    def decode_step(
        self, image_ids: torch.Tensor, position: int | torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Feeds one image token per row, image_ids (B,), at sequence `position` (text_length + i
        for image token i) and returns the logits for the token after it: (B, padded_image_vocab_size).

        Static shapes: the step attends over the cache's full length with positions after
        `position` masked out, so a compiled or CUDA-graphed step never recompiles. Pass `position`
        as a one-element long tensor on the model's device to keep Python ints out of the step.
        """
        input_pos = torch.as_tensor(position, device=image_ids.device).view(1)
        index = input_pos - self.config.text_length  # image position, row-major
        x = self._embed_image(image_ids[:, None], index)  # (B, 1, C)
        x = self._blocks_cached(x, cache, input_pos)  # (B, 1, C)
        return self.image_head(x[:, -1])  # (B, Vi)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy in fp32 over the real vocabulary (the head's padding columns are no tokens,
    so they take no share of the softmax), skipping IGNORE_INDEX targets; targets are ids, or
    distributions over the vocabulary (..., vocab_size)."""
    logits = logits[..., :vocab_size].float()  # a view when the vocabulary is already a multiple of 64
    soft = targets.is_floating_point()
    targets = targets.float().reshape(-1, vocab_size) if soft else targets.reshape(-1)
    return F.cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=IGNORE_INDEX)
