"""
FLOPs a training step executes, and the peak a GPU could execute them at: the two halves of MFU.

    MFU = tokens/s x FLOPs per token / (peak FLOP/s per device x devices)

Counted (PaLM appendix B, nanoGPT's estimate_mfu, torchtitan): every matmul's 6 FLOPs per weight
and per position it runs at (2 forward, 4 backward), output heads included, and attention's
12 L d T per position. Not counted: embedding lookups (no multiply-adds), norms, biases,
activations, the softmax, and any forward that activation checkpointing repeats (model FLOPs,
not hardware FLOPs). torch.utils.flop_counter counts the same for a training step of the prior
with attention's math kernel (tests/test_transformer_and_sampling.py).

The peak is the dense (no 2:4 sparsity) bf16 tensor-core figure of NVIDIA's datasheets.
"""

from __future__ import annotations

import torch

# Keyed by the exact name torch.cuda.get_device_name gives: the H100 PCIe and NVL cards share the
# "H100" of the SXM part but not its clocks, so a substring match would credit them with its peak.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM: the H100 SXM's compute with more and faster memory
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU `device_name` (torch.cuda.get_device_name), None if unknown."""
    return PEAK_BF16_FLOPS.get(device_name)


def matmul_flops(weights: int, positions: int) -> int:
    """Training FLOPs of matmuls holding `weights` weights, run at `positions` positions: per weight
    and position 2 forward and 4 backward (the gradients of the input and of the weight)."""
    return 6 * weights * positions


def attention_flops(n_layer: int, n_embd: int, positions: int) -> int:
    """Training FLOPs of self-attention over `positions` positions: per query and layer, q k^T and
    the weighted sum of v cost 2 d T each forward and twice that backward, 12 L d T in all (PaLM
    appendix B). The whole T x T scores, as PaLM and nanoGPT count them: a causal kernel skips
    about half, which is then a gain the MFU does not show."""
    return 12 * n_layer * n_embd * positions * positions


def causal_lm_flops_per_token(model: torch.nn.Module, positions: int) -> float:
    """Training FLOPs per token of a `transformers` causal LM run at `positions` positions, counted
    as above: 6 per matmul weight (GPT-2's Conv1D, every Linear, the head whether tied to the token
    table or not, whose lookup is no matmul) and position, and attention."""
    from transformers.pytorch_utils import Conv1D  # transformers is imported where an LLM is counted

    config = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (Conv1D, torch.nn.Linear)))
    return (matmul_flops(weights, positions) + attention_flops(config.num_hidden_layers, config.hidden_size, positions)) / positions
