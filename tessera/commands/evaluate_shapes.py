"""Caption fidelity on the synthetic shapes set: does the prior draw what its caption says? And
with --captions, caption accuracy: does an LLM backbone say what a scene shows?

    tessera evaluate shapes --prior CKPT --num-samples N [--seed S] [--cfg-scale 1.5] [--top-k 64] [--out FILE.json]
    tessera evaluate shapes --prior LLM_CKPT --captions --num-samples N [--seed S] [--out FILE.json]

The prior draws one image per prompt; the deterministic analyser of datamodules/shapes_analysis.py
reads back each image's shapes and `match` judges them against the caption, per attribute (count,
color, shape, size, position), colour and kind bound together (color_and_shape), and all together
(all); that module's docstring defines each. Two groups of N prompts each:

    seen      the captions of SyntheticShapes(N, seed=S), the training distribution. The
              quickstart trains on seed 0 and validates on seed 1, hence S = 1000 by default.
              Every single-object caption (240 of them) is in any training set of a few thousand
              samples; most exact multi-object captions are not, though all their parts are.
    held_out  HELD_OUT_SCENES, cycled to N prompts. The generator draws every combination of the
              grammar with some probability (datamodules/shapes.py excludes none, so no training
              set can be promised to lack one); these eleven captions occur in none of the first
              100,000 samples of seeds 0 and 1 (tests/test_shapes_analysis.py checks 20,000 and
              5,000), while each of their noun phrases is common. The three pairs are the only
              pair captions, of all 9,216, absent from those 200,000 samples; they test the
              binding of attributes to a relation, the rows and columns that of three objects.

The report opens with the numbers to quote (seen_all, seen_color_and_shape, held_out_all,
held_out_color_and_shape, analyser_all, chance_all), then gives per group, beside its fidelity,
for the same prompts:

    analyser  the same judgement of real renders at the same size: the analyser's own accuracy,
              which bounds what fidelity can show (1.0 at 32 and 64 px); "exact" is the share of
              renders whose every shape (colour, kind, size, cell) is read exactly.
    chance    the fidelity of a prior that draws perfect scenes of the training distribution and
              ignores its caption: each prompt matched against CHANCE_DRAWS random scenes.

--captions turns the test around for a model that also captions images (LLMTextImageModel, image
to text): the same scenes of both groups are rendered exactly (`render`, at the size of the
model's stage-1 tokenizer), the model captions each (greedy unless --temperature, --top-k or
--top-p), `parse_prompt` reads the caption back with the grammar, and `match` judges it against
the scene's true objects, per attribute as above: the caption is the statement, the scene what it
must hold for. A caption true of its scene scores on every attribute whichever of the grammar's
true captions it is ("A left of B" or "B right of A"); a caption outside the grammar is wrong on
every attribute and counted as `unparsed`. The report gives per group the accuracy, the unparsed
count, the chance level (the caption of a random training scene, CHANCE_DRAWS of them, judged
against each scene) and the first captions beside their scenes'. The held-out group is the same
eleven scenes cycled, so greedy captions repeat: its accuracy moves in steps of 1/11.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from datamodules.shapes import LAYOUTS, MIN_IMAGE_SIZE, Scene, ShapeObject, caption, render, sample_scene, to_json
from datamodules.shapes_analysis import ATTRIBUTES, analyse, expected_from_json, match, parse_prompt
from tessera.commands.sample import add_sampling_arguments, sampling_settings
from tessera.launch import process_device

if TYPE_CHECKING:  # torch only when sampling: `tessera --help` builds this module's parser
    from tessera.sampling import SamplingConfig

log = logging.getLogger(__name__)

DEFAULT_SEED = 1000  # of the seen prompts: not the quickstart's train (0) or val (1) seed
CHANCE_DRAWS = 64  # random scenes each prompt is matched against for the chance level


def _scene(layout: str, relation: str | None, *objects: tuple[str, str, str, int, int]) -> Scene:
    return Scene(tuple(ShapeObject(shape, color, size, row, col) for size, color, shape, row, col in objects), layout, relation)


# (size, color, shape, row, col) per object, in caption order
HELD_OUT_SCENES = (
    _scene("pair", "above", ("small", "red", "circle", 0, 0), ("large", "blue", "square", 1, 0)),
    _scene("pair", "above", ("large", "orange", "triangle", 0, 2), ("large", "red", "square", 2, 2)),
    _scene("pair", "below", ("small", "purple", "square", 2, 1), ("large", "purple", "triangle", 0, 1)),
    _scene("row", None, ("small", "red", "circle", 2, 0), ("small", "red", "square", 2, 1), ("small", "red", "triangle", 2, 2)),
    _scene("row", None, ("large", "yellow", "diamond", 0, 0), ("small", "purple", "diamond", 0, 1), ("large", "yellow", "diamond", 0, 2)),
    _scene("row", None, ("large", "blue", "triangle", 1, 0), ("large", "blue", "triangle", 1, 1), ("large", "blue", "triangle", 1, 2)),
    _scene("row", None, ("small", "green", "square", 1, 0), ("large", "orange", "circle", 1, 1), ("small", "purple", "diamond", 1, 2)),
    _scene("column", None, ("large", "green", "circle", 0, 0), ("large", "orange", "circle", 1, 0), ("large", "blue", "circle", 2, 0)),
    _scene("column", None, ("small", "orange", "square", 0, 2), ("large", "purple", "triangle", 1, 2), ("small", "green", "diamond", 2, 2)),
    _scene("column", None, ("small", "yellow", "square", 0, 1), ("large", "red", "diamond", 1, 1), ("small", "purple", "circle", 2, 1)),
    _scene("column", None, ("large", "red", "triangle", 0, 1), ("small", "yellow", "triangle", 1, 1), ("large", "red", "triangle", 2, 1)),
)


class ImageGenerator(Protocol):
    """What the evaluation needs of a prior: TextImagePrior.generate."""

    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None, seed: int = 0): ...


class Captioner(Protocol):
    """What the captioning mode needs of a model: LLMTextImageModel.caption and image_size."""

    image_size: int

    def caption(self, images, sampling: SamplingConfig | None = None, seed: int = 0) -> list[str]: ...


def evaluation_scenes(num_samples: int, seed: int = DEFAULT_SEED) -> dict[str, list[Scene]]:
    """{"seen": the scenes of SyntheticShapes(num_samples, seed=seed), "held_out": HELD_OUT_SCENES cycled to num_samples}."""
    # SyntheticShapes draws sample i from random.Random(f"{seed}:{i}") (datamodules/shapes.py)
    seen = [sample_scene(random.Random(f"{seed}:{index}")) for index in range(num_samples)]
    held_out = [HELD_OUT_SCENES[index % len(HELD_OUT_SCENES)] for index in range(num_samples)]
    return {"seen": seen, "held_out": held_out}


def judge(scenes: list[Scene], images: list[Image.Image | np.ndarray]) -> list[dict[str, bool]]:
    """`match` of each image's analysis against its scene's caption."""
    return [match(_expected(scene), analyse(image)) for scene, image in zip(scenes, images)]


def fractions(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """The share of verdicts true, per attribute (0.0 for none)."""
    return {name: round(float(np.mean([v[name] for v in verdicts])) if verdicts else 0.0, 4) for name in ATTRIBUTES}


def analyser_accuracy(scenes: list[Scene], image_size: int) -> dict[str, float]:
    """`fractions` of real renders of `scenes` at `image_size`, and "exact": every shape read exactly."""
    verdicts, exact = [], []
    for scene in scenes:
        truth = to_json(scene, image_size)
        found = analyse(render(scene, image_size))
        verdicts.append(match(expected_from_json(truth), found))
        exact.append(_shapes(found) == _shapes(truth))
    return {**fractions(verdicts), "exact": round(float(np.mean(exact)), 4) if exact else 0.0}


def chance_levels(scenes: list[Scene], seed: int = DEFAULT_SEED, draws: int = CHANCE_DRAWS) -> dict[str, float]:
    """The fidelity of perfect images of random training scenes that ignore the prompt."""
    pool = _random_scenes(seed, draws)
    verdicts = [match(_expected(scene), to_json(other, MIN_IMAGE_SIZE)) for scene in scenes for other in pool]
    return fractions(verdicts)


def caption_chance_levels(scenes: list[Scene], seed: int = DEFAULT_SEED, draws: int = CHANCE_DRAWS) -> dict[str, float]:
    """The accuracy of a captioner that ignores the image and gives the caption of a random training scene."""
    pool = _random_scenes(seed, draws)
    verdicts = [match(_expected(other), to_json(scene, MIN_IMAGE_SIZE)) for scene in scenes for other in pool]
    return fractions(verdicts)


def _random_scenes(seed: int, draws: int) -> list[Scene]:
    return [sample_scene(random.Random(f"chance:{seed}:{index}")) for index in range(draws)]


def evaluate_shapes(
    prior: ImageGenerator,
    num_samples: int,
    seed: int = DEFAULT_SEED,
    sampling: SamplingConfig | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
) -> dict:
    """The caption-fidelity report of the module docstring, as a JSON-ready dict.

    Args:
        prior: a TextImagePrior, or anything whose generate(prompts, sampling, seed) gives
            (B, 3, H, W) images in [-1, 1].
        num_samples: images drawn for each group, seen and held_out.
        seed: draws the seen prompts and seeds generation (batch b at seed + its first index).
        sampling: how image tokens are drawn; SamplingConfig() if None.
        image_size: side at which images are analysed and the analyser's real renders drawn;
            None is the prior's own. Generated images of another size are resized (bilinear).
        batch_size: prompts generated at once.
    """
    from tessera.pixels import to_uint8
    from tessera.sampling import SamplingConfig

    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    sampling = sampling or SamplingConfig()
    groups = evaluation_scenes(num_samples, seed)
    scenes = [scene for group in groups.values() for scene in group]
    prompts = [caption(scene) for scene in scenes]

    started = time.perf_counter()
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prior.generate(prompts[start : start + batch_size], sampling, seed=seed + start)  # (B, 3, H, W)
        batch = to_uint8(batch).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        images.extend(Image.fromarray(image) for image in batch)
        log.info("[evaluate shapes] %d/%d images", len(images), len(prompts))
    generated = time.perf_counter() - started
    image_size = image_size or images[0].width
    images = [image if image.width == image_size else image.resize((image_size, image_size), Image.Resampling.BILINEAR) for image in images]

    started = time.perf_counter()
    verdicts = judge(scenes, images)
    results = {}
    for index, (name, group) in enumerate(groups.items()):
        results[name] = {
            "n": len(group),
            "fidelity": fractions(verdicts[index * num_samples : (index + 1) * num_samples]),
            "analyser": analyser_accuracy(group, image_size),
            "chance": chance_levels(group, seed),
        }
    results["seen"]["fidelity_by_layout"] = {
        layout: {"n": len(mine), **fractions(mine)}
        for layout in LAYOUTS
        if (mine := [v for v, scene in zip(verdicts, groups["seen"]) if scene.layout == layout])
    }
    results["held_out"]["prompts"] = [caption(scene) for scene in HELD_OUT_SCENES]
    return {
        "image_size": image_size,
        "num_samples": num_samples,
        "seed": seed,
        "sampling": asdict(sampling),
        **headline(results),
        **results,
        "seconds": {"generate": round(generated, 2), "analyse": round(time.perf_counter() - started, 2)},
    }


def judge_captions(scenes: list[Scene], captions: list[str]) -> tuple[list[dict[str, bool]], list[int]]:
    """`match` of each caption, read back with `parse_prompt`, against its scene's true objects; a
    caption outside the grammar is wrong on every attribute. Returns the verdicts and the indices
    of the captions that did not parse."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    verdicts, unparsed = [], []
    for index, (scene, text) in enumerate(zip(scenes, captions)):
        try:
            stated = parse_prompt(text)
        except ValueError:
            unparsed.append(index)
            verdicts.append(dict.fromkeys(ATTRIBUTES, False))
            continue
        verdicts.append(match(stated, to_json(scene, MIN_IMAGE_SIZE)))
    return verdicts, unparsed


def evaluate_captions(
    model: Captioner,
    num_samples: int,
    seed: int = DEFAULT_SEED,
    sampling: SamplingConfig | None = None,
    batch_size: int = 32,
    examples: int = 8,
) -> dict:
    """The caption-accuracy report of the module docstring (--captions), as a JSON-ready dict.

    Args:
        model: an LLMTextImageModel, or anything with `image_size` whose caption(images, sampling,
            seed) gives a caption per (B, 3, H, W) image in [-1, 1].
        num_samples: scenes captioned in each group, seen and held_out.
        seed: draws the seen scenes and seeds captioning (batch b at seed + its first index).
        sampling: None captions greedily, else draws with its temperature, top-k and top-p.
        batch_size: images captioned at once.
        examples: captions kept in the report per group, beside their scenes' own.
    """
    import torch

    from tessera.pixels import to_unit_range

    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    groups = evaluation_scenes(num_samples, seed)
    scenes = [scene for group in groups.values() for scene in group]
    image_size = model.image_size

    started = time.perf_counter()
    captions = []
    for start in range(0, len(scenes), batch_size):
        pixels = np.stack([np.asarray(render(scene, image_size)) for scene in scenes[start : start + batch_size]])
        images = to_unit_range(torch.from_numpy(pixels).permute(0, 3, 1, 2))  # (B, 3, S, S)
        captions.extend(model.caption(images, sampling, seed=seed + start))
        log.info("[evaluate shapes] %d/%d captions", len(captions), len(scenes))
    captioned = time.perf_counter() - started

    verdicts, unparsed = judge_captions(scenes, captions)
    results = {}
    for index, (name, group) in enumerate(groups.items()):
        mine = range(index * num_samples, (index + 1) * num_samples)
        results[name] = {
            "n": len(group),
            "accuracy": fractions([verdicts[i] for i in mine]),
            "unparsed": sum(i in mine for i in unparsed),
            "chance": caption_chance_levels(group, seed),
            "examples": [{"caption": captions[i], "truth": caption(scenes[i])} for i in mine[:examples]],
        }
    results["seen"]["accuracy_by_layout"] = {
        layout: {"n": len(mine), **fractions(mine)}
        for layout in LAYOUTS
        if (mine := [v for v, scene in zip(verdicts, groups["seen"]) if scene.layout == layout])
    }
    numbers = {}
    for group in ("seen", "held_out"):
        numbers |= {f"{group}_{name}": results[group]["accuracy"][name] for name in ("all", "color_and_shape")}
        numbers[f"{group}_unparsed"] = results[group]["unparsed"]
    numbers["chance_all"] = results["seen"]["chance"]["all"]
    return {
        "image_size": image_size,
        "num_samples": num_samples,
        "seed": seed,
        "decoding": "greedy" if sampling is None else asdict(sampling),
        **numbers,
        **results,
        "seconds": {"caption": round(captioned, 2)},
    }


def headline(report: dict) -> dict[str, float]:
    """The numbers to quote, flat, from a report's groups: fidelity of all attributes and of colour
    and kind bound together per group, the analyser's least accuracy, the chance of all attributes."""
    numbers = {}
    for group in ("seen", "held_out"):
        numbers |= {f"{group}_{name}": report[group]["fidelity"][name] for name in ("all", "color_and_shape")}
    numbers["analyser_all"] = min(report[group]["analyser"]["all"] for group in ("seen", "held_out"))
    numbers["chance_all"] = report["seen"]["chance"]["all"]
    return numbers


def _expected(scene: Scene) -> dict:
    return expected_from_json(to_json(scene, MIN_IMAGE_SIZE))  # bboxes unused: any size will do


def _shapes(scene: dict) -> list[tuple]:
    return sorted((obj["color"], obj["shape"], obj["size"], obj["row"], obj["col"]) for obj in scene["objects"])


# -----------------------------------------------------------------------------
# command line


def add_shapes_parser(evaluations: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`tessera evaluate shapes`: registered by tessera/commands/cli.py in its `evaluate` group."""
    parser = evaluations.add_parser(
        "shapes", help="caption fidelity on the synthetic shapes set: colour, shape, size and position read back",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prior", required=True, type=Path,
                        help="a prior or LLM backbone checkpoint or export trained on the shapes set")
    parser.add_argument("--captions", action="store_true",
                        help="score the model's captions of rendered scenes instead of its images (an LLM backbone)")
    parser.add_argument("--num-samples", type=int, default=200,
                        help="images (or captions) for the seen prompts, and as many for the held-out ones (200: +-3.5%% at 50%%)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="draws the seen prompts and seeds sampling")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
    parser.add_argument("--image-size", type=int, default=None, help="side images are analysed at; the prior's own by default")
    parser.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    parser.add_argument("--fine-stage", type=Path, default=None, help="the multi-scale fine stage, if not where the checkpoint says or to add one")
    parser.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (JSON)")
    parser.set_defaults(run=_evaluate_shapes)
    return parser


def _evaluate_shapes(args: argparse.Namespace) -> int:
    from lightning_modules.llm import is_llm, load_image_generator

    if args.captions:
        if not is_llm(args.prior):
            raise SystemExit(f"--captions: {args.prior} holds no LLMTextImageModel; only a language-model backbone captions images")
        if args.cfg_scale is not None or args.fine_stage is not None or args.image_size is not None:
            raise SystemExit("--captions captions exact renders at the tokenizer's size, without guidance: "
                             "--cfg-scale, --fine-stage and --image-size are for images")
    prior = load_image_generator(args.prior, map_location=process_device(args.device), tokenizer=args.tokenizer,
                                 fine_stage=args.fine_stage)
    if args.captions:
        from tessera.commands.caption import caption_sampling

        sampling = caption_sampling(args.temperature, args.top_k, args.top_p)
        report = {"prior": str(args.prior), "mode": "captions",
                  **evaluate_captions(prior, args.num_samples, args.seed, sampling, args.batch_size)}
    else:
        sampling, sources = sampling_settings(prior.sampling, args)
        report = {"prior": str(args.prior), "fine_stage": prior.hparams.get("fine_stage"), "sampling": asdict(sampling), "sampling_from": sources,
                  **evaluate_shapes(prior, args.num_samples, args.seed, sampling, args.image_size, args.batch_size)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
