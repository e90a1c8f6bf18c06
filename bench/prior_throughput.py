"""Prior training throughput: tokens per second and MFU of full training steps of the "300m"
text-image Transformer (24 layers x 1024, 16 heads) at 64 caption + 256 image tokens (a 16x16
grid of a 16,384-code tokenizer), against `transformers`' GPT-2 of the same shape, in one run.

Every setting times full optimizer steps on one random batch already on the device (the data
loader is measured apart, by bench/data_throughput.py), after warm-up steps (compilation happens
there), with CUDA synchronised around the timed steps. A step is: forward and loss under bf16
autocast (fp32 weights), backward, gradient-norm clip 1.0, fused AdamW step (lr 3e-4, betas
(0.9, 0.95), weight decay 0.05 on matrices, as PriorModule), zero_grad(set_to_none=True).
  - tessera: `TextImageTransformer.loss` (separate text and image heads, fp32 cross-entropy,
    text 1 : image 7), eager;
  - tessera+compile: the same with `torch.compile` of the whole loss (embeddings, blocks, both
    heads and the cross-entropy in one graph);
  - tessera+compile-blocks: each Block compiled in place, the heads and the loss eager;
  - tessera+compile-blocks-heads: each Block compiled in place and the heads with their fp32
    cross-entropy as one graph (`TextImageTransformer.head_losses`), as `TextImagePrior(compile=True)`
    trains;
  - tessera+fsdp2, tessera+compile-blocks+fsdp2: the unsharded eager and compile-blocks rows under
    FSDP2 as configs/trainer/fsdp.yaml shards the prior (`lightning_modules.parallel.shard`: each
    Block a unit, then the rest; bf16 gathers and fp32 gradient reduction; blocks compiled after
    sharding), in a process group of this one process: what FSDP2's gathers, casts and hooks cost,
    and its peak memory, beside the unsharded rows (DDP's step on one GPU, which has no one to talk
    to either);
  - gpt2: the reference a user would otherwise write: `transformers.GPT2LMHeadModel` of the same
    shape (n_positions 320, dropout 0 as ours, SDPA attention, head tied to the input embedding)
    over one joint vocabulary, text ids then image ids offset by 49,408: 65,792 ids, 65,856 with
    the padding the reference measurement used; loss from `labels=`, cross-entropy over all 319
    next-token targets; eager;
  - gpt2+compile: the same with `torch.compile(model)` (its loss is inside forward, so inside
    the graph, as with tessera+compile).
  - llama: the LLM backbone family's step (lightning_modules/llm.py) on a `transformers`
    LlamaForCausalLM of the prior's size, random init from its config (`llama_config`: the same
    layers, width and heads, SwiGLU at the prior's 8/3 d rounded up to 64, RMSNorm, RoPE, no
    biases, SDPA attention, tied embeddings as configs/llm/tiny_llama_shapes.yaml) over the family's
    vocabulary (text ids, <boi>, <eoi>, then the codes: 65,794 at 300m); the batch is half
    caption-then-image rows, half image-then-caption rows (`tessera.llm.build_sequences`,
    image_to_text 0.5, 323 positions with <boi>, <eoi> and <eos>), the loss `tessera.llm.sequence_loss`
    over every target of both directions; eager;
  - llama+compile: the same with `torch.compile(model)` (the loss eager, as the family trains).

Tokens per step are batch x 320 for tessera and GPT-2 (tessera feeds 319 positions, the last image
token is only a target; GPT-2 feeds 320 and computes logits for the last one too), batch x 323
for Llama (its sequences carry <boi>, <eoi> and a caption's <eos>). MFU = tokens/s x FLOPs
per token / peak, the FLOPs each model executes, counted by tessera/flops.py for both (6 per
matmul weight and position, heads included, + attention's 12 L d T per position as PaLM
appendix B; embedding lookups not counted): tessera's blocks at 319 positions, its 49,408-wide
text head at 63 and its 16,384-wide image head at 256 (`TextImageTransformer.flops_per_token`);
GPT-2's blocks and its 65,856-wide head at all 320, 13% more work per token than tessera's;
Llama's blocks and its 65,794-wide head at all 323 (6 N + attention, N every matmul weight with
the head, `causal_lm_flops_per_token`).
Peak: the device's dense bf16 figure from tessera/flops.py's table of device names (989 TFLOP/s
on an H100 SXM or an H200; printed in the header); --peak-flops for a device the table lacks,
which otherwise reports no MFU. The one-H100 80GB reference, GPT-2 at 72.0k tokens/s eager
and 165.7k compiled, is 16.8% and 38.7% MFU counted so (13.9% and 32.0% without its head, as
the reference gives them).

    python bench/prior_throughput.py                                  # one H100: all settings, batch 64
    python bench/prior_throughput.py --settings tessera+compile gpt2+compile --steps 50
    python bench/prior_throughput.py --settings tessera llama llama+compile       # the LLM family's row
    python bench/prior_throughput.py --tiny                           # CPU smoke run, 2 layers x 64

--tiny compiles with the "aot_eager" backend unless --compile-backend is given: it checks that
every setting traces and steps, in seconds on a CPU, without Inductor's code generation.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import socket
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_modules.parallel import shard
from tessera.flops import causal_lm_flops_per_token, peak_bf16_flops
from tessera.llm import ImageVocabulary, build_sequences, sequence_loss
from tessera.nn.transformer import TextImageTransformer, TransformerConfig

SETTINGS = ["tessera", "tessera+compile", "tessera+compile-blocks", "tessera+compile-blocks-heads", "tessera+fsdp2",
            "tessera+compile-blocks+fsdp2", "gpt2", "gpt2+compile", "llama", "llama+compile"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prior_config(tiny: bool) -> TransformerConfig:
    if tiny:
        # a 4,096-id caption vocabulary keeps the embedding and head small on a CPU; its last two ids
        # play CLIP's start and end of text (49,406 and 49,407 of 49,408)
        return TransformerConfig(
            n_layer=2, n_head=4, n_embd=64, text_vocab_size=4096, text_length=16, image_grid=4, image_vocab_size=512
        )
    return TransformerConfig.from_name("300m", text_length=64, image_grid=16, image_vocab_size=16384)


def gpt2_config(config: TransformerConfig) -> GPT2Config:
    """GPT-2 of the prior's shape over one joint vocabulary: 49,408 + 16,384 = 65,792 ids at 300m,
    plus one spare row, rounded up to a multiple of 64: 65,856, the vocabulary of the reference measurement."""
    return GPT2Config(
        vocab_size=_round_up(config.text_vocab_size + config.image_vocab_size + 1, 64),
        n_positions=config.sequence_length,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,  # GPT-2 defaults to 0.1; ours uses none, so neither pays for dropout
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 means nothing in this vocabulary; no end of sequence: every sample is whole
        eos_token_id=None,
    )


def llama_config(config: TransformerConfig) -> LlamaConfig:
    """A Llama of the prior's shape over the LLM backbone family's vocabulary (tessera/llm.py: text
    ids, <boi>, <eoi>, then the codes), its MLP as wide as the prior's SwiGLU would be (8/3 d rounded
    up to 64, the parameters of a 4 d GELU MLP), embeddings tied as configs/llm/tiny_llama_shapes.yaml."""
    return LlamaConfig(
        vocab_size=llm_vocabulary(config).size,
        hidden_size=config.n_embd,
        intermediate_size=_round_up(8 * config.n_embd // 3, 64),
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        max_position_embeddings=config.sequence_length + 3,  # <boi>, <eoi>, and <eos> after a caption
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        bos_token_id=None,  # no start token: both directions' rows begin with the caption or <boi>
        eos_token_id=config.text_vocab_size - 1,  # CLIP's end of text, as in null_caption
        pad_token_id=None,
    )


def llm_vocabulary(config: TransformerConfig) -> ImageVocabulary:
    return ImageVocabulary(config.text_vocab_size, config.image_vocab_size)


def gpt2_non_embedding_params(model: GPT2LMHeadModel) -> int:
    """Parameters without the token and position tables (the head is tied to the token table):
    the same N as `TextImageTransformer.num_params()`."""
    n = sum(p.numel() for p in model.parameters())  # parameters() counts the tied head once
    return n - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """PriorModule's optimizer: decay on matrices and embeddings only, fused kernels."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)


@dataclass
class OneProcessSharding:
    """What `lightning_modules.parallel.shard` reads of AtomicModelParallelStrategy, for a mesh of this process alone."""

    data_parallel_mesh: DeviceMesh
    root_device: torch.device
    reshard_after_forward: bool = True  # configs/trainer/fsdp.yaml's


@contextmanager
def one_process_group(device: torch.device) -> Iterator[OneProcessSharding]:
    """A process group of this one process (NCCL on a GPU, gloo on a CPU) for the FSDP2 settings,
    torn down after, so the benchmarks that follow run without one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield OneProcessSharding(init_device_mesh(device.type, (1,)), device)
    finally:
        dist.destroy_process_group()


@dataclass
class Trainee:
    """A model, a closure computing its loss on the bench batch, and its FLOPs per token."""

    model: torch.nn.Module
    loss: Callable[[], torch.Tensor]
    n_params: int  # without embeddings
    flops_per_token: float
    seq_len: int  # positions a sequence feeds: the tokens a step counts per row


def build(name: str, config: TransformerConfig, batch_size: int, device: torch.device, compile_kwargs: dict,
          sharding: OneProcessSharding | None = None) -> Trainee:
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, config.text_vocab_size, (batch_size, config.text_length), generator=generator)
    image_ids = torch.randint(0, config.image_vocab_size, (batch_size, config.image_length), generator=generator)
    text_ids, image_ids = text_ids.to(device), image_ids.to(device)
    torch.manual_seed(0)

    if name.startswith("tessera"):
        model = TextImageTransformer(config).to(device)
        text_mask = torch.ones_like(text_ids)  # every caption position real: the most text targets
        if sharding is not None:  # as TextImagePrior.configure_model under configs/trainer/fsdp.yaml
            shard(model, model.blocks, sharding, "bf16-mixed", methods=("loss",))  # `loss` gathers from here on
        loss_fn = model.loss
        if name == "tessera+compile":
            loss_fn = torch.compile(model.loss, **compile_kwargs)
        elif "compile-blocks" in name:
            for block in model.blocks:
                block.compile(**compile_kwargs)
            if name == "tessera+compile-blocks-heads":
                model.head_losses = torch.compile(model.head_losses, **compile_kwargs)
        n_params = model.num_params()
        return Trainee(
            model, lambda: loss_fn(text_ids, text_mask, image_ids)["loss"], n_params, model.flops_per_token(),
            config.sequence_length,
        )

    if name.startswith("llama"):
        model = LlamaForCausalLM(llama_config(config)).to(device)
        # half the rows caption their image, as LLMTextImageModel(image_to_text=0.5) trains
        to_text = torch.arange(batch_size) % 2 == 1
        vocab = llm_vocabulary(config)
        ids, kinds = build_sequences(text_ids.tolist(), image_ids, to_text, vocab, bos=None, eos=model.config.eos_token_id, pad=0)
        forward = torch.compile(model, **compile_kwargs) if name == "llama+compile" else model
        n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        return Trainee(
            model,
            lambda: sequence_loss(forward(input_ids=ids, use_cache=False).logits, ids, kinds)["loss"],
            n_params,
            causal_lm_flops_per_token(model, ids.size(1)),
            ids.size(1),
        )

    model = GPT2LMHeadModel(gpt2_config(config)).to(device)
    model.loss_type = "ForCausalLM"  # the loss labels= gives anyway, named so that transformers does not warn
    input_ids = torch.cat([text_ids, image_ids + config.text_vocab_size], dim=1)  # (B, 320): one joint vocabulary
    forward = torch.compile(model, **compile_kwargs) if name == "gpt2+compile" else model
    n_params = gpt2_non_embedding_params(model)
    return Trainee(
        model,
        lambda: forward(input_ids=input_ids, labels=input_ids).loss,
        n_params,
        causal_lm_flops_per_token(model, config.sequence_length),
        config.sequence_length,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    name: str, args: argparse.Namespace, config: TransformerConfig, device: torch.device, peak: float | None
) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_kwargs = {"backend": args.compile_backend}
    if args.compile_backend == "inductor" and args.compile_mode != "default":
        compile_kwargs["mode"] = args.compile_mode
    with one_process_group(device) if name.endswith("+fsdp2") else nullcontext() as sharding:
        return measure_steps(name, args, config, device, peak, compile_kwargs, sharding)


def measure_steps(name: str, args: argparse.Namespace, config: TransformerConfig, device: torch.device,
                  peak: float | None, compile_kwargs: dict, sharding: OneProcessSharding | None) -> dict:
    trainee = build(name, config, args.batch_size, device, compile_kwargs, sharding)
    model = trainee.model.train()
    optimizer = adamw(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = trainee.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):  # compilation, cuBLAS/cuDNN heuristics, the optimizer's state allocation
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - started

    seq_len = trainee.seq_len
    tokens_per_s = args.batch_size * seq_len * args.steps / seconds
    result = {
        "setting": name,
        "batch": args.batch_size,
        "seq_len": seq_len,
        "tokens_per_s": round(tokens_per_s),
        "mfu": None if peak is None else round(tokens_per_s * trainee.flops_per_token / peak, 4),
        "ms_per_step": round(1000 * seconds / args.steps, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        "params_non_embedding": trainee.n_params,
        "flops_per_token": round(trainee.flops_per_token),
        "timed_steps": args.steps,
        "loss": round(loss.item(), 4),
    }
    if "compile" in name:
        result["compile"] = compile_kwargs
    return result


def release(device: torch.device) -> None:
    """Frees the last setting's model, optimizer state, compiled graphs and cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (64; 4 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (20; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first, compilation included (5; 1 with --tiny)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (inductor; aot_eager with --tiny)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                        help="Inductor mode for every compiled setting, both sides")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="dense bf16 peak FLOP/s of the device for MFU; default: tessera/flops.py's, by its name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 wide, 16 + 16 tokens: checks the script runs")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.tiny else 64)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    return args


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The header, then one result per setting as it is measured."""
    device = torch.device(args.device)
    config = prior_config(args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_flops if args.peak_flops is not None else (peak_bf16_flops(name) if name else None)
    header = {
        "bench": "prior_throughput",
        "device": name or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peak_flops": peak,
        "precision": "bf16 autocast, fp32 weights, fused AdamW",
        "shape": f"{config.n_layer} layers x {config.n_embd}, {config.n_head} heads, "
                 f"{config.text_length} text + {config.image_length} image tokens",
    }
    yield header
    for name in args.settings:
        try:
            result = measure(name, args, config, device, peak)
        except torch.OutOfMemoryError:
            result = {"setting": name, "batch": args.batch_size, "error": "out of memory"}
        release(device)
        yield result


def main() -> None:
    for record in run(parse_args()):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
