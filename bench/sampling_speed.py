"""Sampling speed: images per second of the "300m" prior drawing a 16x16 grid of image tokens
(256 steps, top-k 256, temperature 1) for 64 captions at once, against `transformers`' GPT-2
`generate` of the same size, in one run.

The captions are 64 random sequences of 64 text ids (the content does not change the work).
Both sides run with bf16 weights (`model.to(torch.bfloat16)`, no autocast) on CUDA, fp32 on a CPU.
Each setting draws whole batches after warm-up batches (compilation and CUDA-graph recording
happen there), CUDA synchronised around the timed ones:
  - tessera: `sample_image_tokens` with its static KV cache, eager;
  - tessera+cfg: the same with classifier-free guidance, cfg_scale 3: the empty caption's rows
    join the batch, so every step runs 128 rows for 64 images;
  - tessera+compile, tessera+compile+cfg: the same with `torch.compile(model.decode_step)`, mode
    "reduce-overhead" (CUDA graphs) by default, --compile-mode to change it. As transformers'
    StaticCache does, `KVCache` marks its tensors with `torch._dynamo.mark_static_address`,
    without which CUDA graphs skip a step that writes into its inputs; `cudagraph_skips` in the
    output says whether graphs were used. The prefill and
    the per-token top-k draw stay eager, as in transformers;
  - tessera-nocache: `use_cache=False`, the full forward over the growing sequence at every step.
    One warm-up and one timed batch; with --nocache-steps K only K evenly spaced steps of that
    loop are timed and the rest interpolated linearly (`extrapolated_from_steps` in the output);
  - rq, rq+cfg: the RQ-Transformer over an 8x8x4 code stack, the same 256 ids an image as the
    16x16 grid, at the flat prior's parameters: 20 spatial blocks and 4 depth blocks against 24
    (the RQ-Transformer paper's speed claim: 64 spatial steps instead of 256, each followed by a
    4-step depth loop through its own small cache), eager, the same top-k per code;
  - gpt2+static: `GPT2LMHeadModel.generate(do_sample=True, top_k=256, max_new_tokens=256,
    cache_implementation="static")` over one joint vocabulary (text then image ids, 65,856 at
    300m, as bench/prior_throughput.py); on CUDA transformers compiles the decode step itself
    (its CompileConfig: mode "reduce-overhead"). Reference measurement, one H100 80GB: 67.4 images/s, 3.7 ms/step;
  - gpt2+dynamic: the same with its default dynamic cache, eager (reference: 13.3 images/s);
  - gpt2-nocache: `use_cache=False` (reference: ~7 images/s); one warm-up and one timed batch.
  - llama, llama+cfg: the LLM backbone family's image sampling (`tessera.llm.sample_image_codes`,
    as LLMTextImageModel.generate draws: the caption, <boi>, then 256 codes with the logits cut to
    the codes, top-k over them, `transformers`' dynamic KV cache, eager) on the Llama of the prior's
    size that bench/prior_throughput.py trains (`llama_config`, random init); +cfg guides against
    the empty caption's rows as tessera+cfg does. The flat prior of similar size is tessera and
    tessera+cfg in the same run.
GPT-2 has no end-of-sequence id here, so every row gets all 256 tokens. Its top-k runs over its
65,856-way joint vocabulary, ours over the 16,384 image ids.

images_per_s counts images, not rows (guidance rows are no images); ms_per_token_step is the
batch's wall time over the 256 image tokens, prefill included.

    python bench/sampling_speed.py                                   # one H100: all settings
    python bench/sampling_speed.py --settings tessera+compile gpt2+static --repeats 5
    python bench/sampling_speed.py --tiny                            # CPU smoke run

--tiny (2 layers x 64, 4x4 grid, batch 2) compiles with the "aot_eager" backend unless
--compile-backend is given: it checks that every setting traces and samples, without Inductor's
code generation; on a CPU transformers does not compile its static-cache step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import transformers
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from prior_throughput import gpt2_config, llama_config, llm_vocabulary, prior_config  # the training bench's shapes
from tessera.llm import sample_image_codes
from tessera.nn.rq_transformer import RQTransformer, RQTransformerConfig
from tessera.nn.transformer import TextImageTransformer, TransformerConfig
from tessera.sampling import SamplingConfig, filter_logits, sample_image_tokens

SETTINGS = [
    "tessera", "tessera+cfg", "tessera+compile", "tessera+compile+cfg", "tessera-nocache", "rq", "rq+cfg",
    "gpt2+static", "gpt2+dynamic", "gpt2-nocache", "llama", "llama+cfg",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rq_config(config: TransformerConfig, code_depth: int = 4, depth_n_layer: int = 4) -> RQTransformerConfig:
    """The RQ-Transformer with the flat prior's blocks split between its spatial and depth
    transformers, over a grid of as many ids: 16x16 becomes 8x8x4 (4x4 becomes 2x2x4)."""
    side = math.isqrt(config.image_length // code_depth)
    if side * side * code_depth != config.image_length:
        raise ValueError(f"{config.image_length} image ids are no square grid of {code_depth}-code stacks")
    depth_n_layer = min(depth_n_layer, config.n_layer - 1)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig)}
    return RQTransformerConfig(**{**fields, "image_grid": side, "n_layer": config.n_layer - depth_n_layer},
                               code_depth=code_depth, depth_n_layer=depth_n_layer)


def null_caption(model: TextImageTransformer) -> torch.Tensor:
    """The empty caption as CaptionTokenizer gives it with CLIP's BPE: start of text, then end of
    text repeated as padding; CLIP's start and end ids are its last two."""
    c = model.config
    ids = torch.full((c.text_length,), c.text_vocab_size - 1, dtype=torch.long)
    ids[0] = c.text_vocab_size - 2
    return ids


def compile_decode_step(model: TextImageTransformer, compile_kwargs: dict) -> None:
    """torch.compile of the decode step (the cache marks its own tensors static for CUDA graphs)."""
    model.decode_step = torch.compile(model.decode_step, **compile_kwargs)


def uncompile(model: torch.nn.Module) -> None:
    model.__dict__.pop("decode_step", None)  # the class's own method again


def time_batches(run: Callable[[], torch.Tensor], warmup: int, repeats: int, device: torch.device) -> float:
    """Seconds per batch of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        run()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    return (time.perf_counter() - started) / repeats


@torch.inference_mode()
def time_nocache_steps(
    model: TextImageTransformer, prompts: torch.Tensor, sampling: SamplingConfig, steps: int, device: torch.device
) -> float:
    """Seconds per batch of the cacheless loop from `steps` of its steps, evenly spaced and timed
    one by one (the body of tessera.sampling's uncached loop), the others interpolated linearly."""
    n_image, vocab = model.config.image_length, model.config.image_vocab_size
    tokens = torch.zeros(prompts.size(0), n_image, dtype=torch.long, device=device)
    positions = np.unique(np.linspace(0, n_image - 1, max(steps, 2)).round().astype(int))

    def step(i: int) -> None:
        _, image_logits = model(prompts, tokens[:, : i + 1])  # (B, i + 1, Vi)
        probs = filter_logits(image_logits[:, -1, :vocab].float(), sampling).softmax(dim=-1)
        tokens[:, i] = torch.multinomial(probs, num_samples=1).squeeze(-1)

    model.eval()
    for i in (0, n_image - 1):  # warm-up at both ends of the lengths timed
        step(int(i))
    seconds = []
    for i in positions:
        sync(device)
        started = time.perf_counter()
        step(int(i))
        sync(device)
        seconds.append(time.perf_counter() - started)
    return float(np.interp(np.arange(n_image), positions, seconds).sum())


def measure(
    name: str, args: argparse.Namespace, models: dict, prompts: torch.Tensor, device: torch.device
) -> dict:
    n_image = models["config"].image_length  # ids per image, the RQ-Transformer's too
    warmup, repeats = args.warmup, args.repeats
    extra: dict = {}
    skips_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]

    if name.startswith(("tessera", "rq")):
        model = models["rq" if name.startswith("rq") else "tessera"]
        guided = "cfg" in name
        sampling = SamplingConfig(top_k=args.top_k, cfg_scale=args.cfg_scale if guided else 1.0)
        null_text_ids = null_caption(model) if guided else None
        if "compile" in name:
            compile_kwargs = {"backend": args.compile_backend}
            if args.compile_backend == "inductor" and args.compile_mode != "default":
                compile_kwargs["mode"] = args.compile_mode
            compile_decode_step(model, compile_kwargs)
            extra["compile"] = {"decode_step": compile_kwargs}
        if guided:
            extra["cfg_scale"] = args.cfg_scale
            extra["rows_per_step"] = 2 * len(prompts)
        use_cache = name != "tessera-nocache"

        def run() -> torch.Tensor:
            return sample_image_tokens(model, prompts, sampling, null_text_ids=null_text_ids, use_cache=use_cache)

        try:
            if not use_cache and args.nocache_steps:
                seconds = time_nocache_steps(model, prompts, sampling, args.nocache_steps, device)
                extra["extrapolated_from_steps"] = args.nocache_steps
            else:
                if not use_cache:
                    warmup, repeats = 1, 1
                seconds = time_batches(run, warmup, repeats, device)
        finally:
            uncompile(model)
    elif name.startswith("llama"):
        model, vocab = models["llama"], llm_vocabulary(models["config"])
        guided = name == "llama+cfg"
        sampling = SamplingConfig(top_k=args.top_k, cfg_scale=args.cfg_scale if guided else 1.0)
        rows = prompts.tolist()
        if guided:
            extra["cfg_scale"] = args.cfg_scale
            extra["rows_per_step"] = 2 * len(prompts)

        def run() -> torch.Tensor:
            return sample_image_codes(model, vocab, rows, n_image, sampling, null_prompt=[] if guided else None)

        seconds = time_batches(run, warmup, repeats, device)
    else:
        model = models["gpt2"]
        kwargs = dict(
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            top_k=args.top_k,
            temperature=1.0,
            max_new_tokens=n_image,
            pad_token_id=0,
        )
        if name == "gpt2+static":
            kwargs["cache_implementation"] = "static"
            if device.type == "cuda":
                extra["compile"] = {"transformers CompileConfig": transformers.CompileConfig().to_dict()}
        elif name == "gpt2-nocache":
            kwargs["use_cache"] = False
            warmup, repeats = 1, 1

        def run() -> torch.Tensor:
            out = model.generate(prompts, **kwargs)
            if out.shape != (len(prompts), prompts.size(1) + n_image):
                raise RuntimeError(f"generate stopped early: {tuple(out.shape)}")
            return out

        seconds = time_batches(run, warmup, repeats, device)

    result = {
        "setting": name,
        "batch": len(prompts),
        "images_per_s": round(len(prompts) / seconds, 2),
        "ms_per_token_step": round(1000 * seconds / n_image, 2),
        "seconds_per_batch": round(seconds, 3),
        "timed_batches": None if "extrapolated_from_steps" in extra else repeats,
        **extra,
    }
    if "compile" in result and device.type == "cuda":
        result["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips_before
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="captions per batch (64; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per setting (3; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches first, compilation included (2; 1 with --tiny)")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="guidance scale of the +cfg settings")
    parser.add_argument("--nocache-steps", type=int, default=0,
                        help="time only this many steps of tessera's cacheless loop, interpolate the rest (0: all)")
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (inductor; aot_eager with --tiny)")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=["reduce-overhead", "default", "max-autotune"],
                        help="Inductor mode for tessera's decode step (transformers uses reduce-overhead for its own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 wide, 4x4 image grid: checks the script runs")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 64)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    return args


def rq_header(models: dict) -> dict:
    """The RQ-Transformer's shape and both models' parameters (without embeddings), when it runs."""
    if "rq" not in models:
        return {}
    c = models["rq"].config
    return {
        "rq_shape": f"{c.n_layer} spatial + {c.depth_n_layer} depth layers, {c.image_grid}x{c.image_grid}x{c.code_depth} codes",
        "params": {name: models[name].num_params() for name in ("tessera", "rq") if name in models},
    }


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The header, then one result per setting as it is measured."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = prior_config(args.tiny)
    torch.manual_seed(0)
    models = {"config": config}
    if any(s.startswith("tessera") for s in args.settings):
        models["tessera"] = TextImageTransformer(config).to(device, dtype).eval()
    if any(s.startswith("rq") for s in args.settings):
        models["rq"] = RQTransformer(rq_config(config)).to(device, dtype).eval()
    if any(s.startswith("gpt2") for s in args.settings):
        models["gpt2"] = GPT2LMHeadModel(gpt2_config(config)).to(device, dtype).eval()
    if any(s.startswith("llama") for s in args.settings):
        models["llama"] = LlamaForCausalLM(llama_config(config)).to(device, dtype).eval()
    prompts = torch.randint(0, config.text_vocab_size, (args.batch_size, config.text_length),
                            generator=torch.Generator().manual_seed(0)).to(device)

    header = {
        "bench": "sampling_speed",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "weights": f"{str(dtype).removeprefix('torch.')} (model.to(dtype), no autocast), both sides",
        "shape": f"{config.n_layer} layers x {config.n_embd}, {config.n_head} heads, "
                 f"{config.text_length} text + {config.image_length} image tokens",
        "top_k": args.top_k,
        "gpt2_vocab": models["gpt2"].config.vocab_size if "gpt2" in models else None,
        "llama_vocab": models["llama"].config.vocab_size if "llama" in models else None,
        **rq_header(models),
    }
    yield header
    for name in args.settings:
        torch._dynamo.reset()  # every compiled setting gets its own graphs for its own shapes
        try:
            result = measure(name, args, models, prompts, device)
        except torch.OutOfMemoryError:
            result = {"setting": name, "batch": args.batch_size, "error": "out of memory"}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield result


def main() -> None:
    for record in run(parse_args()):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
