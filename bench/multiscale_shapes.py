"""What the fine map of multi-scale tokens adds on the shapes set, and what its sampling costs.

Given an exported multi-scale tokenizer and fine stage (configs/tokenizer/tiny_shapes_multiscale.yaml
and configs/fine_stage/tiny_shapes.yaml, each trained with `tessera fit` and exported), on the
renders of `--scenes` seen evaluation scenes:
  - reconstruction PSNR and colour-and-kind verdicts of the coarse map decoded alone, of the coarse
    map with the true fine map, and of the coarse map with the fine map the fine stage draws from
    it (its most likely ids, and a top-k draw), and the fine stage's accuracy against the true ids;
  - sampling time per image of the prior's coarse map (a prior of configs/prior/tiny_shapes.yaml's
    shape, KV-cached, guidance 1.5, top-k 64: the quickstart's), of the fine stage's one pass, and
    of the decoder. The prior's weights do not change its time, so it is random here.

    python bench/multiscale_shapes.py --tokenizer runs/ms_tokenizer/export --fine-stage runs/ms_fine/export
    python bench/multiscale_shapes.py --tiny   # random-init networks: the timings and that it runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from lightning_modules.fine_stage import FineStage, load_fine_stage
from lightning_modules.vqgan import load_tokenizer
from shapes_tokenizer import renders
from tessera.commands.evaluate_shapes import evaluation_scenes, fractions, judge
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.fine_transformer import FineStageConfig
from tessera.nn.finite_scalar_quantizer import FiniteScalarQuantizer
from tessera.nn.multiscale_tokenizer import MultiScaleIds, MultiScaleQuantizer
from tessera.nn.transformer import TextImageTransformer, TransformerConfig
from tessera.nn.vq_tokenizer import build_tokenizer
from tessera.pixels import psnr, to_uint8
from tessera.sampling import SamplingConfig, sample_image_tokens

REPO = Path(__file__).resolve().parents[1]
PRIOR_CONFIG = REPO / "configs" / "prior" / "tiny_shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="an exported multi-scale tokenizer (or its VQGAN checkpoint)")
    parser.add_argument("--fine-stage", type=Path, help="an exported fine stage (or its checkpoint)")
    parser.add_argument("--tiny", action="store_true", help="random-init networks of the tiny configs' shapes")
    parser.add_argument("--scenes", type=int, default=256, help="seen evaluation scenes reconstructed")
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once for the timings")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches; the median is reported")
    parser.add_argument("--top-k", type=int, default=8, help="top-k of the fine stage's drawn (not most likely) ids")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = parser.parse_args(argv)
    if not args.tiny and (args.tokenizer is None or args.fine_stage is None):
        parser.error("give --tokenizer and --fine-stage, or --tiny")
    return args


def tiny_networks():
    """Random-init networks of configs/tokenizer/tiny_shapes_multiscale.yaml's and configs/fine_stage/tiny_shapes.yaml's shapes."""
    quantizer = MultiScaleQuantizer(FiniteScalarQuantizer((8, 6, 5)), FiniteScalarQuantizer((5, 5, 5)))
    autoencoder = AutoencoderConfig(ch=16, ch_mult=(1, 4), num_res_blocks=1, z_channels=32, image_size=32, encoder="patch")
    config = FineStageConfig(coarse_vocab_size=240, fine_vocab_size=125, coarse_grid=8, n_layer=2, n_head=4, n_embd=64, window=2)
    return build_tokenizer(autoencoder, quantizer).eval(), FineStage(config).eval()


def reconstructions(tokenizer, stage: FineStage, images: torch.Tensor, top_k: int) -> dict[str, torch.Tensor | float]:
    """The four decodings of the module docstring, and the fine stage's accuracy."""
    ids = tokenizer.encode(images)
    most_likely = stage.transformer.generate(ids.coarse)
    drawn = stage.transformer.generate(ids.coarse, SamplingConfig(top_k=top_k), torch.Generator(images.device).manual_seed(0))
    return {
        "coarse_only": tokenizer.decode(ids.coarse),
        "coarse_and_true_fine": tokenizer.decode(ids),
        "coarse_and_most_likely_fine": tokenizer.decode(MultiScaleIds(ids.coarse, most_likely)),
        f"coarse_and_top{top_k}_fine": tokenizer.decode(MultiScaleIds(ids.coarse, drawn)),
        "fine_accuracy": float((most_likely == ids.fine).float().mean()),
    }


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one untimed call."""
    fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def sampling_times(tokenizer, stage: FineStage, batch_size: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per image of each sampling stage."""
    torch.manual_seed(0)
    shape = yaml.safe_load(PRIOR_CONFIG.read_text())["model"]["init_args"]["transformer"]
    prior = TextImageTransformer(TransformerConfig(**shape), text_head=False).to(device).eval()
    text_ids = torch.randint(prior.config.text_vocab_size, (batch_size, prior.config.text_length), device=device)
    null = torch.randint(prior.config.text_vocab_size, (prior.config.text_length,), device=device)
    sampling = SamplingConfig(top_k=64, cfg_scale=1.5)
    grid = prior.config.image_grid
    coarse = sample_image_tokens(prior, text_ids, sampling, null_text_ids=null).view(batch_size, grid, grid)
    fine = stage.transformer.generate(coarse)
    per_image = {
        "prior_coarse_ms": lambda: sample_image_tokens(prior, text_ids, sampling, null_text_ids=null),
        "fine_stage_ms": lambda: stage.transformer.generate(coarse),
        "decode_coarse_only_ms": lambda: tokenizer.decode(coarse),
        "decode_coarse_and_fine_ms": lambda: tokenizer.decode(MultiScaleIds(coarse, fine)),
    }
    times = {name: round(1000 * timed(fn, repeats, device) / batch_size, 2) for name, fn in per_image.items()}
    times["fine_stage_share_of_sampling"] = round(
        times["fine_stage_ms"] / (times["prior_coarse_ms"] + times["fine_stage_ms"] + times["decode_coarse_and_fine_ms"]), 3
    )
    return times


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.tiny:
        tokenizer, stage = tiny_networks()
    else:
        tokenizer, stage = load_tokenizer(args.tokenizer), load_fine_stage(args.fine_stage)
    tokenizer, stage = tokenizer.to(device), stage.to(device)
    scenes = evaluation_scenes(args.scenes)["seen"]
    images = renders(scenes, tokenizer.config.image_size).to(device)
    report: dict = {"scenes": args.scenes, "tokenizer": str(args.tokenizer), "fine_stage": str(args.fine_stage)}
    with torch.no_grad():
        batches = [reconstructions(tokenizer, stage, images[i : i + 64], args.top_k) for i in range(0, len(images), 64)]
    for name in batches[0]:
        if name == "fine_accuracy":
            report[name] = round(sum(b[name] * len(b["coarse_only"]) for b in batches) / len(images), 3)
            continue
        decoded = torch.cat([b[name] for b in batches])
        verdicts = fractions(judge(scenes, list(to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy())))
        report[name] = {"psnr_db": round(float(psnr(images, decoded).mean()), 2), "color_and_shape": verdicts["color_and_shape"]}
    with torch.no_grad():
        report["sampling"] = {"batch_size": args.batch_size, **sampling_times(tokenizer, stage, args.batch_size, args.repeats, device)}
    return report


def main() -> None:
    print(json.dumps(run(parse_args()), indent=1))


if __name__ == "__main__":
    main()
