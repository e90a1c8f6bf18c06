"""Memory per GPU of a prior's training step, estimated from its configs before a job waits in a queue.

    python bench/memory_estimate.py configs/prior/1_3b.yaml configs/trainer/fsdp.yaml
    python bench/memory_estimate.py configs/prior/300m.yaml configs/trainer/ddp.yaml --batch-size 32
    python bench/memory_estimate.py configs/prior/rq_650m.yaml configs/trainer/ddp.yaml

Counts, in bytes per GPU, for AdamW with fp32 master weights under bf16 autocast:
- states: fp32 weights, gradients and the two Adam moments, 16 bytes a parameter, sharded over
  the GPUs under FSDP;
- DDP's gradient buckets (4 bytes a parameter) and autocast's bf16 copies of the weights (2);
  under FSDP instead two blocks' gathered bf16 parameters (the one running and the one prefetched);
- activations: ~34 bytes per token per layer per unit of width kept for the backward pass in
  bf16 (Korthikanti et al. 2022, without the attention-matrix term, which fused SDPA kernels
  never store); with activation checkpointing each block keeps only its fp32 input and one block
  at a time is recomputed; an RQ-Transformer's depth blocks count the same over the N*D codes;
- the heads' logits: bf16 output, its fp32 copy and the fp32 gradient (10 bytes a logit), at
  every image token (every code of an RQ-Transformer).
The batch size (per GPU) comes from the prior's config (its `data` section), the strategy, activation checkpointing and
the GPU count from the trainer config. Allocator fragmentation and CUDA's context (~0.5-1 GiB)
are not counted: `fits` keeps 15% of the card free. bench/gpu_suite.py sets the estimate for the
300m prior at batch 64 beside the peak bench/prior_throughput.py measures for it on one GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from lightning_modules.prior import prior_class
from tessera.nn.rq_transformer import RQTransformer, RQTransformerConfig
from tessera.nn.transformer import TextImageTransformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# share of a card's memory an estimate may fill: the rest for the allocator's fragmentation and CUDA's context
HEADROOM = 0.85
ACTIVATION_BYTES_PER_TOKEN_LAYER_WIDTH = 34


@dataclass
class MemoryEstimate:
    """GiB per GPU, by kind."""

    parameters: int
    states: float
    buffers: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.states + self.buffers + self.activations + self.logits


def prior_memory(config: TransformerConfig, batch_size: int, sharded: bool, gpus: int,
                 activation_checkpointing: bool, text_loss: bool = True) -> MemoryEstimate:
    """The estimate for one GPU of `gpus`, `batch_size` sequences per GPU (see the module docstring)."""
    residual = isinstance(config, RQTransformerConfig)
    with torch.device("meta"):
        model = RQTransformer(config) if residual else TextImageTransformer(config)
    parameters = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    states = 16 * parameters / (gpus if sharded else 1)
    buffers = 2 * 2 * block if sharded else (4 + 2) * parameters

    activations = block_activations(batch_size * config.sequence_length, config.n_embd, config.n_layer,
                                    activation_checkpointing)
    image_tokens = config.image_tokens if residual else config.image_length
    if residual:  # the depth blocks, over every code
        activations += block_activations(batch_size * image_tokens, config.n_embd, config.depth_n_layer,
                                         activation_checkpointing)

    logits = batch_size * image_tokens * config.padded_image_vocab_size
    if text_loss:
        logits += batch_size * config.text_length * config.padded_text_vocab_size
    return MemoryEstimate(parameters, states / GIB, buffers / GIB, activations / GIB, 10 * logits / GIB)


def block_activations(tokens: int, width: int, layers: int, activation_checkpointing: bool) -> int:
    """Bytes a stack of `layers` blocks keeps for the backward pass over `tokens` positions."""
    one_block = ACTIVATION_BYTES_PER_TOKEN_LAYER_WIDTH * tokens * width
    return layers * 4 * tokens * width + one_block if activation_checkpointing else layers * one_block


def estimate_from_configs(prior_config: Path, trainer_config: Path, data_config: Path,
                          batch_size: int | None = None) -> tuple[MemoryEstimate, dict]:
    """The estimate for a `tessera fit --config PRIOR --config TRAINER --config DATA` run, and what it assumed."""
    prior = yaml.safe_load(prior_config.read_text())
    model = prior["model"]["init_args"]
    trainer = yaml.safe_load(trainer_config.read_text())["trainer"]
    data = yaml.safe_load(data_config.read_text())["data"]["init_args"]
    strategy = trainer.get("strategy", {})
    strategy_class = strategy.get("class_path", "") if isinstance(strategy, dict) else str(strategy)
    strategy_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    transformer = prior_class(prior["model"]).config_class(**model["transformer"])
    assumed = {
        "batch_size": batch_size or prior.get("data", {}).get("init_args", {}).get("batch_size") or data["batch_size"],
        "sharded": "FSDP" in strategy_class or "ModelParallel" in strategy_class,
        "gpus": int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1)),
        "activation_checkpointing": bool(strategy_args.get("activation_checkpointing_policy"))
        or transformer.activation_checkpointing,
        "text_loss": model.get("text_loss_weight", 1.0) != 0,
    }
    return prior_memory(transformer, **assumed), assumed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prior_config", type=Path)
    parser.add_argument("trainer_config", type=Path)
    parser.add_argument("--data-config", type=Path, default=REPO / "configs/data/laion_style.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU; the data config's by default")
    parser.add_argument("--gpu-memory-gib", type=float, default=79.1, help="the card's memory (an H100 80GB: 79.1 GiB)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    estimate, assumed = estimate_from_configs(args.prior_config, args.trainer_config, args.data_config, args.batch_size)
    rounded = {key: round(value, 1) if isinstance(value, float) else value for key, value in asdict(estimate).items()}
    fits = estimate.total <= HEADROOM * args.gpu_memory_gib
    return {**assumed, **rounded, "total_gib": round(estimate.total, 1), "fits": fits}


def main() -> None:
    print(json.dumps(run(parse_args())))


if __name__ == "__main__":
    main()
