"""
Zero-shot FID-N and CLIP score on MS-COCO captions, and FID between folders: `tessera evaluate coco|fid|stats`.
The model is any stage-2 model `load_image_generator` loads: a prior of any class or an LLM backbone.

The protocol is GLIDE's, Imagen's and GigaGAN's / LlamaGen's, stated in results.json:
- captions from COCO 2014 val: `num_samples` images drawn at random with the seed
  (`random.Random(seed).sample` over the captioned images sorted by id), and one of each chosen
  image's captions drawn at random with the same generator (or the first lines of a captions file);
- reference: the whole val2014 folder (40,504 images), or with `--reference chosen` only the chosen images;
- real and generated images: shorter side resized to 256 with PIL (bicubic), centre crop, kept as
  lossless uint8 (generated ones as PNG); Inception sees them resized to 299 as torch-fidelity does;
- no CLIP reranking unless `--candidates` is given; then the count is in the output.

Several processes (torchrun, or the same command under `srun`: rank and world size come from
RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) share the generation without a process group:
the captions are cut into fixed batches of `batch_size // candidates`, batch k is drawn by rank
k % world_size with the seed (seed, k), and every image is written as `samples/NNNNNN.png` the
moment it is made (a temporary file renamed, so never half-written). The images therefore do not
depend on the number of processes, and a rerun of the same command draws only the batches with
missing images and writes only the missing ones. Ranks other than 0 exit after their share; rank 0
then waits until every PNG exists (`--wait-timeout`), and alone reads them all back for FID and
CLIP score (Inception at ~4.5k images/s makes this a few seconds of the run), reusing cached
reference statistics (`--reference-stats`), which rank 0 refuses before sampling if they were made
with another extractor, other weights (their sha256 is in the file and in results.json) or other
preprocessing. A run.json pins the settings, so a rerun with other settings into the same folder
is refused instead of mixing images. Every input file is checked before any of this starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.commands.sample import add_sampling_arguments
from tessera.launch import process_device, rank_and_world_size

if TYPE_CHECKING:  # torch, torchmetrics and PIL load when a command runs, not when the CLI parser is built
    import torch.nn as nn

    from tessera.fid import FrechetDistance

PROTOCOL = (
    "zero-shot FID on MS-COCO 2014 val captions (GLIDE, Imagen, GigaGAN/LlamaGen): N images chosen at random with the seed, "
    "one of each image's captions at random; reference: the whole val2014 set unless stated; real and generated images "
    "centre-cropped and resized to 256 with PIL (bicubic), lossless uint8; Inception v3 (TF 2015-12-05 weights) pool3 "
    "features of images resized to 299 as torch-fidelity does; statistics and matrix square root in float64; TF32 off"
)


def choose_samples(annotations: str | Path, images_dir: str | Path, num_samples: int, seed: int) -> list[dict]:
    """The protocol's captions: `num_samples` images at random, one of each one's captions at random."""
    from datamodules.sources import CocoSource

    coco = CocoSource(annotations, images_dir)
    captioned = [image for image in coco.images if coco.captions.get(image["id"])]
    if num_samples > len(captioned):
        raise ValueError(f"{annotations} has {len(captioned)} captioned images, fewer than --num-samples {num_samples}")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(captioned)), num_samples)
    samples = []
    for index, position in enumerate(chosen):
        image = captioned[position]
        samples.append({"index": index, "image_id": image["id"], "file_name": image["file_name"],
                        "caption": rng.choice(coco.captions[image["id"]])})
    return samples


def caption_list(path: str | Path, num_samples: int) -> list[dict]:
    """A fixed caption list: the first `num_samples` non-empty lines of a text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < num_samples:
        raise ValueError(f"{path} has {len(lines)} captions, fewer than --num-samples {num_samples}")
    return [{"index": index, "caption": caption} for index, caption in enumerate(lines[:num_samples])]


def sample_path(out: Path, index: int) -> Path:
    return out / "samples" / f"{index:06d}.png"


def write_png(image, path: Path, image_size: int) -> None:
    """(3, H, W) uint8 -> a PNG of image_size (resized and cropped as the real images are), atomically."""
    from PIL import Image

    from datamodules.images import resize_and_crop

    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if picture.size != (image_size, image_size):
        picture = Image.fromarray(resize_and_crop(picture, image_size))
    partial = path.with_name(path.name + ".partial")
    picture.save(partial, format="PNG")
    os.replace(partial, path)


def load_extractor(spec: str) -> nn.Module:
    """'package.module:callable' -> the nn.Module the callable returns (a feature network in place of Inception)."""
    import torch.nn as nn

    module_name, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--feature-extractor takes MODULE:CALLABLE, got {spec!r}")
    extractor = getattr(importlib.import_module(module_name), name)()
    if not isinstance(extractor, nn.Module):
        raise TypeError(f"{spec} returned {type(extractor).__name__}, not an nn.Module")
    return extractor


def local_metric(extractor: nn.Module | None, inception_weights, extractor_id: str | None, image_size: int, device) -> FrechetDistance:
    """A FID metric that never syncs: one process reads every image."""
    from tessera.fid import FrechetDistance

    return FrechetDistance(extractor, inception_weights, extractor_id, image_size, sync_on_compute=False,
                           distributed_available_fn=_never).to(device)


def _never() -> bool:
    return False


def evaluate_coco(
    prior: str | Path,
    out: str | Path,
    images: str | Path,
    annotations: str | Path | None = None,
    captions: str | Path | None = None,
    num_samples: int = 30_000,
    seed: int = 0,
    batch_size: int = 32,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    cfg_scale: float | None = None,
    candidates: int = 1,
    clip_model: str = "ViT-B-32-quickgelu",
    clip_weights: str | Path | None = None,
    caption_prefix: str = "",
    inception_weights: str | Path | None = None,
    extractor: nn.Module | None = None,
    extractor_id: str | None = None,
    reference: str = "all",
    reference_stats: str | Path | None = None,
    image_size: int = 256,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 4,
    wait_timeout: float = 3600.0,
    poll_seconds: float = 10.0,
) -> dict | None:
    """Generate this rank's share of the protocol's images; on rank 0, then FID, CLIP score and results.json.
    Sampling settings left None are the prior's own (its `sampling` argument), else SamplingConfig's.

    Returns the results on rank 0, None on the others. See the module docstring for the protocol."""
    from lightning_modules.llm import image_generator_config
    from tessera.clip_score import CONVENTIONS
    from tessera.fid import frechet_distance, sha256
    from tessera.sampling import SamplingConfig, with_overrides

    started = time.perf_counter()
    out = Path(out)
    samples = _checked_samples(prior, images, annotations, captions, num_samples, seed, reference, candidates,
                               clip_model, clip_weights, inception_weights, tokenizer, uses_inception=extractor is None)
    device_ = process_device(device)
    cache = (Path(reference_stats) if reference_stats else out / "reference_stats.pt") if reference == "all" else None
    # rank 0 measures; its metric now, so that cached reference statistics made with another extractor,
    # other weights or other preprocessing are refused before sampling, not after
    metric = local_metric(extractor, inception_weights, extractor_id, image_size, device_) if rank == 0 else None
    if metric is not None and cache is not None and cache.is_file():
        metric.load_statistics(cache)
    recorded = image_generator_config(prior).get("sampling")
    sampling, sources = with_overrides(SamplingConfig(**recorded) if recorded else None, top_k=top_k, top_p=top_p,
                                       temperature=temperature, cfg_scale=cfg_scale)
    settings = {
        "checkpoint_sha256": sha256(prior),
        "captions": str(Path(annotations or captions).name), "num_samples": num_samples, "seed": seed,
        "sampler": {**asdict(sampling), "sampling_from": sources,
                    "candidates": candidates, "rerank_clip_model": clip_model if candidates > 1 else None},
        "batch_size": batch_size, "image_size": image_size,
    }
    (out / "samples").mkdir(parents=True, exist_ok=True)
    _pin_settings(out / "run.json", settings, rank)

    generate_share(out, samples, prior, tokenizer, sampling, seed, batch_size, candidates, clip_model, clip_weights,
                   image_size, device_, rank, world_size)
    if rank != 0:
        return None

    _wait_for_samples(out, num_samples, wait_timeout, poll_seconds)
    measure_started = time.perf_counter()
    real, reference_text = reference_features(metric, reference, images, cache, samples, workers)
    files = [sample_path(out, i) for i in range(num_samples)]
    fake, scores = sample_features(metric, files, samples, image_size, workers, clip_model, clip_weights,
                                   caption_prefix, device_)
    fid = frechet_distance(real, fake)
    _write_grid(out, files[:64])
    total_generated, generation_seconds = generation_totals(out, world_size)
    results = {
        "fid": fid,
        "clip_cosine": scores["clip_cosine"],
        "clip_score": scores["clip_score"],
        "count": fake.count,
        "protocol": {
            "description": PROTOCOL,
            "captions": f"{Path(annotations).name}: {num_samples} images at random (seed {seed}), one caption each at random"
            if annotations else f"the first {num_samples} lines of {Path(captions).name}",
            "reference": reference_text,
            "reference_stats": str(cache) if cache is not None else None,
            "image_size": image_size,
            "preprocessing": metric.preprocessing,
            "feature_extractor": metric.extractor_id,
            "feature_extractor_weights_sha256": metric.weights_sha256,
            "clip_model": clip_model if clip_weights is not None else None,
            "clip_conventions": CONVENTIONS,
            "caption_prefix": caption_prefix,
            "reranking": f"best of {candidates} by CLIP {clip_model}" if candidates > 1 else "none",
        },
        "sampler": settings["sampler"] | {"seed": seed, "batch_size": batch_size},
        "checkpoint": str(prior),
        "checkpoint_sha256": settings["checkpoint_sha256"],
        "world_size": world_size,
        "device": str(device_),
        "images_generated_this_run": total_generated,
        "generation_seconds": round(generation_seconds, 3),
        "images_per_s": round(total_generated / generation_seconds, 3) if total_generated else None,
        "measure_seconds": round(time.perf_counter() - measure_started, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _checked_samples(prior, images, annotations, captions, num_samples: int, seed: int, reference: str,
                     candidates: int, clip_model: str, clip_weights, inception_weights, tokenizer,
                     uses_inception: bool) -> list[dict]:
    """The protocol's captions (and COCO images), after every option and input file is checked."""
    if (annotations is None) == (captions is None):
        raise ValueError("give the COCO annotations file or a captions file, one of them")
    if reference not in ("all", "chosen") or (reference == "chosen" and annotations is None):
        raise ValueError("--reference is 'all' (the images folder) or 'chosen' (the chosen COCO images; needs --annotations)")
    if candidates > 1 and clip_weights is None:
        raise ValueError("--candidates above 1 reranks with CLIP: pass --clip-weights")
    check_inputs(prior, images, annotations or captions, tokenizer, clip_model, clip_weights, inception_weights,
                 uses_inception=uses_inception)
    samples = choose_samples(annotations, images, num_samples, seed) if annotations else caption_list(captions, num_samples)
    if reference == "chosen":
        missing = [s["file_name"] for s in samples if not (Path(images) / s["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {num_samples} chosen images are not in {images} (e.g. {missing[0]}): "
                                    "--reference chosen reads them all")
    return samples


def generate_share(out: Path, samples: list[dict], prior, tokenizer, sampling, seed: int, batch_size: int,
                   candidates: int, clip_model: str, clip_weights, image_size: int, device, rank: int,
                   world_size: int) -> None:
    """This rank's images: fixed batches, batch k on rank k % world_size, only missing images drawn.
    Writes OUT/ranks/rankNNNN.json with how many it drew and how long that took."""
    from lightning_modules.llm import load_image_generator
    from tessera.clip_rerank import ClipScorer, rerank
    from tessera.pixels import to_uint8

    per_batch = max(1, batch_size // candidates)
    blocks = [range(start, min(start + per_batch, len(samples))) for start in range(0, len(samples), per_batch)]
    mine = [(k, block) for k, block in enumerate(blocks) if k % world_size == rank]
    todo = [(k, block) for k, block in mine if not all(sample_path(out, i).exists() for i in block)]
    generated, started = 0, time.perf_counter()
    if todo:
        model = load_image_generator(prior, map_location=device, tokenizer=tokenizer)
        scorer = ClipScorer(clip_model, clip_weights, device) if candidates > 1 else None
        for k, block in todo:
            prompts = [samples[i]["caption"] for i in block]
            drawn = model.generate([p for p in prompts for _ in range(candidates)], sampling, seed=seed * 1_000_003 + k)
            if scorer is not None:
                drawn, _ = rerank(drawn, prompts, candidates, 1, scorer)
            drawn = to_uint8(drawn).cpu()
            for offset, i in enumerate(block):
                if not sample_path(out, i).exists():
                    write_png(drawn[offset], sample_path(out, i), image_size)
                    generated += 1
    seconds = time.perf_counter() - started
    (out / "ranks").mkdir(exist_ok=True)
    (out / "ranks" / f"rank{rank:04d}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world_size, "generated": generated, "seconds": seconds, "device": str(device)}) + "\n")


def reference_features(metric: FrechetDistance, reference: str, images, cache: Path | None, samples: list[dict],
                       workers: int):
    """(the reference's FeatureStats, what they are of): every image of the folder (cached), or the chosen ones."""
    from datamodules.image_folder import add_images, reference_statistics

    if reference == "all":
        real = reference_statistics(metric, images, cache, workers=workers)
        return real, f"all {real.count} images of {Path(images).name}"
    add_images(metric, [Path(images) / s["file_name"] for s in samples], real=True, workers=workers)
    real = metric.statistics(real=True)
    metric.reset()
    return real, f"the {real.count} chosen images"


def sample_features(metric: FrechetDistance, files: list[Path], samples: list[dict], image_size: int, workers: int,
                    clip_model: str, clip_weights, caption_prefix: str, device):
    """(the generated images' FeatureStats, their CLIP scores in both conventions, None without CLIP weights)."""
    from datamodules.image_folder import image_batches
    from tessera.clip_rerank import ClipScorer
    from tessera.clip_score import ClipScore, with_prefix
    from tessera.pixels import to_unit_range

    clip = ClipScore().to(device) if clip_weights is not None else None
    scorer = ClipScorer(clip_model, clip_weights, device) if clip is not None else None
    for indices, batch in image_batches(files, image_size, workers=workers):
        batch = batch.to(device)
        metric.update(batch, real=False)
        if scorer is not None:
            prompts = with_prefix([samples[i]["caption"] for i in indices.tolist()], caption_prefix)
            clip.update(scorer(to_unit_range(batch), prompts))
    scores = clip.compute() if clip is not None else {"clip_cosine": None, "clip_score": None}
    return metric.statistics(real=False), scores


def generation_totals(out: Path, world_size: int) -> tuple[int, float]:
    """(images drawn by this run's ranks, the slowest rank's seconds), from OUT/ranks/."""
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    ranks = [r for r in ranks if r["world_size"] == world_size and r["rank"] < world_size]
    return sum(r["generated"] for r in ranks), max(r["seconds"] for r in ranks)


def check_inputs(prior: str | Path, images: str | Path, captions_file: str | Path, tokenizer: str | Path | None,
                 clip_model: str, clip_weights: str | Path | None, inception_weights: str | Path | None,
                 uses_inception: bool) -> None:
    """Every file the run reads, checked before any work: a missing one fails now, not hours into sampling."""
    from tessera.clip_rerank import check_clip_weights
    from tessera.fid import find_inception_weights

    if not Path(prior).exists():
        raise FileNotFoundError(f"--prior {prior}: no such checkpoint (.ckpt, sharded checkpoint or export directory)")
    if not Path(captions_file).is_file():
        raise FileNotFoundError(f"captions {captions_file}: no such file")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"--images {images}: no such directory (the val2014 images, FID's reference)")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such checkpoint or export directory")
    check_clip_weights(clip_model, clip_weights)
    if uses_inception:
        find_inception_weights(inception_weights)


def _pin_settings(path: Path, settings: dict, rank: int) -> None:
    """Refuse to add images made with other settings to a folder; rank 0 records them the first time."""
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
            raise ValueError(f"{path.parent} holds a run with other settings ({', '.join(changed)}): use another --out")
    elif rank == 0:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(partial, path)


def _wait_for_samples(out: Path, num_samples: int, timeout: float, poll_seconds: float) -> None:
    expected = {sample_path(out, i).name for i in range(num_samples)}
    deadline = time.monotonic() + timeout
    while missing := expected - set(os.listdir(out / "samples")):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(missing)} of {num_samples} images still missing in {out / 'samples'} after {timeout:.0f}s "
                f"(e.g. {min(missing)}): a rank stopped early; run the same command again to draw only the missing ones"
            )
        time.sleep(poll_seconds)


def _write_grid(out: Path, files: list[Path]) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    from datamodules.images import decode_image

    images = [torch.from_numpy(np.array(decode_image(f.read_bytes()))).permute(2, 0, 1) for f in files]
    grid = make_grid(torch.stack(images), nrow=8, padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out / "grid.png")


# -----------------------------------------------------------------------------
# the command line


def add_coco_fid_parsers(evaluations) -> None:
    """`tessera evaluate coco`, `tessera evaluate fid` and `tessera evaluate stats`."""
    coco = evaluations.add_parser(
        "coco", help="zero-shot FID-N and CLIP score of a prior on MS-COCO 2014 val captions; results.json",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    coco.add_argument("--prior", required=True, type=Path,
                      help="a prior (of any prior class) or LLMTextImageModel checkpoint (.ckpt, FSDP sharded) or export directory")
    captions = coco.add_mutually_exclusive_group(required=True)
    captions.add_argument("--annotations", type=Path, help="captions_val2014.json")
    captions.add_argument("--captions", type=Path, help="instead: a fixed caption list, one a line")
    coco.add_argument("--images", required=True, type=Path, help="the val2014 image folder (the reference)")
    coco.add_argument("--num-samples", type=int, default=30_000)
    coco.add_argument("--seed", type=int, default=0, help="chooses images and captions, and seeds sampling")
    coco.add_argument("--batch-size", type=int, default=32, help="images drawn at once (with candidates)")
    add_sampling_arguments(coco)
    coco.add_argument("--candidates", type=int, default=1, help="draw N per caption and keep CLIP's best (needs --clip-weights)")
    coco.add_argument("--reference", choices=["all", "chosen"], default="all", help="all val2014 images, or only the chosen ones")
    coco.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    _metric_arguments(coco)
    coco.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip architecture of --clip-weights")
    coco.add_argument("--clip-weights", type=Path, default=None, help="local CLIP weights: CLIP score (and reranking)")
    coco.add_argument("--caption-prefix", default="", help='put before captions for CLIP score, e.g. "A photo depicts "')
    coco.add_argument("--reference-stats", type=Path, default=None, help="cache of the reference statistics (OUT/reference_stats.pt)")
    coco.add_argument("--rank", type=int, default=None, help="from RANK or SLURM_PROCID, else 0")
    coco.add_argument("--world-size", type=int, default=None, help="from WORLD_SIZE or SLURM_NTASKS, else 1")
    coco.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds rank 0 waits for the other ranks' images")
    coco.add_argument("--out", required=True, type=Path)
    coco.set_defaults(run=_coco)

    fid = evaluations.add_parser("fid", help="FID between two image folders (or a statistics file and a folder)")
    fid.add_argument("real", type=Path, help="a folder of images, or a `tessera evaluate stats` file")
    fid.add_argument("fake", type=Path, help="a folder of images")
    _metric_arguments(fid)
    fid.set_defaults(run=_fid)

    stats = evaluations.add_parser("stats", help="reference feature statistics of a folder, for --reference-stats")
    stats.add_argument("directory", type=Path)
    stats.add_argument("--out", required=True, type=Path, help="the statistics file (.pt)")
    _metric_arguments(stats)
    stats.set_defaults(run=_stats)


def _metric_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=256, help="centre crop side real and generated images are compared at")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="pt_inception-2015-12-05-6726825d.pth; default: $TORCH_HOME/hub/checkpoints")
    parser.add_argument("--feature-extractor", default=None, metavar="MODULE:CALLABLE",
                        help="another feature network: a callable returning an nn.Module, (B,3,H,W) uint8 -> (B,D)")
    parser.add_argument("--workers", type=int, default=4, help="processes decoding images")
    parser.add_argument("--device", default=None, help="cuda when there is one, else cpu")


def _extractor(args: argparse.Namespace) -> tuple[nn.Module | None, str | None]:
    return (load_extractor(args.feature_extractor), args.feature_extractor) if args.feature_extractor else (None, None)


def _coco(args: argparse.Namespace) -> int:
    extractor, extractor_id = _extractor(args)
    rank, world_size = rank_and_world_size(args.rank, args.world_size)
    results = evaluate_coco(
        args.prior, args.out, args.images, annotations=args.annotations, captions=args.captions,
        num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, cfg_scale=args.cfg_scale, candidates=args.candidates, clip_model=args.clip_model,
        clip_weights=args.clip_weights, caption_prefix=args.caption_prefix, inception_weights=args.inception_weights,
        extractor=extractor, extractor_id=extractor_id, reference=args.reference, reference_stats=args.reference_stats,
        image_size=args.image_size, tokenizer=args.tokenizer, device=args.device,
        rank=rank, world_size=world_size,
        workers=args.workers, wait_timeout=args.wait_timeout,
    )
    if results is not None:
        keys = ("fid", "clip_cosine", "clip_score", "count", "images_per_s", "wall_seconds")
        print(json.dumps({key: results[key] for key in keys} | {"out": str(args.out)}))
    return 0


def _fid(args: argparse.Namespace) -> int:
    from datamodules.image_folder import reference_statistics
    from tessera.fid import frechet_distance

    extractor, extractor_id = _extractor(args)
    metric = local_metric(extractor, args.inception_weights, extractor_id, args.image_size, process_device(args.device))
    if args.real.is_file():
        real = metric.load_statistics(args.real)
    else:
        real = reference_statistics(metric, args.real, None, workers=args.workers)
    fake = reference_statistics(metric, args.fake, None, workers=args.workers)
    print(json.dumps({"fid": frechet_distance(real, fake), "real_count": real.count, "fake_count": fake.count,
                      "feature_extractor": metric.extractor_id, "feature_extractor_weights_sha256": metric.weights_sha256,
                      "image_size": args.image_size}))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from datamodules.image_folder import reference_statistics

    extractor, extractor_id = _extractor(args)
    metric = local_metric(extractor, args.inception_weights, extractor_id, args.image_size, process_device(args.device))
    stats = reference_statistics(metric, args.directory, None, workers=args.workers)
    stats.save(args.out)
    print(json.dumps({"out": str(args.out), "count": stats.count, "feature_extractor": stats.extractor,
                      "feature_extractor_weights_sha256": stats.weights_sha256, "preprocessing": stats.preprocessing}))
    return 0
