"""The shapes analyser reads rendered scenes back exactly, through noise, blur and tint; captions
parse back to their scenes; `match` judges each attribute as its docstring says; and
`tessera evaluate shapes` reports caption fidelity of a prior checkpoint end to end, and scores
captions of rendered scenes exactly against the scenes."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from datamodules.shapes import LAYOUTS, Scene, ShapeObject, SyntheticShapes, caption, render, sample_scene, to_json
from datamodules.shapes_analysis import ATTRIBUTES, analyse, expected_from_json, match, parse_prompt
from tessera.commands.evaluate_shapes import HELD_OUT_SCENES, evaluate_captions, evaluate_shapes, evaluation_scenes, judge_captions
from tests.test_prior import Tokens, tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir is a fixture)
from tests.test_vqgan import trainer


def scenes(count: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(random.Random(f"{seed}:{index}")) for index in range(count)]


def attribute_accuracy(images: list[Image.Image], truths: list[Scene]) -> dict[str, float]:
    """Per true object: is a shape found in its cell (position), with its colour, kind, size; and
    per scene: are exactly the true shapes found, nothing more (exact)."""
    hits = {name: [] for name in ("position", "color", "shape", "size")}
    exact = []
    for image, scene in zip(images, truths):
        found = analyse(image)["objects"]
        in_cell = {(obj["row"], obj["col"]): obj for obj in found}
        for obj in scene.objects:
            read = in_cell.get((obj.row, obj.col))
            hits["position"].append(read is not None)
            for name in ("color", "shape", "size"):
                hits[name].append(read is not None and read[name] == getattr(obj, name))
        key = lambda obj: (obj["color"], obj["shape"], obj["size"], obj["row"], obj["col"])  # noqa: E731
        exact.append(sorted(map(key, found)) == sorted(map(key, to_json(scene, image.width)["objects"])))
    return {**{name: float(np.mean(values)) for name, values in hits.items()}, "exact": float(np.mean(exact))}


def degrade(image: Image.Image, rng: np.random.Generator, noise: float, blur: float = 0.0, tint: float = 0.0) -> Image.Image:
    """A generator's faults: Gaussian blur (sigma, pixels), then a tint of the whole image and
    per-pixel Gaussian noise (RGB levels)."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, tint, 3) + rng.normal(0, noise, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))


# -----------------------------------------------------------------------------
# the analyser


@pytest.mark.parametrize("image_size", [64, 32])
def test_analyser_reads_colour_shape_size_and_cell_of_rendered_scenes(image_size):
    truths = scenes(300, seed=11)
    accuracy = attribute_accuracy([render(scene, image_size) for scene in truths], truths)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


@pytest.mark.parametrize(("image_size", "noise", "blur", "tint"), [(64, 12, 0, 0), (32, 12, 0, 0), (64, 8, 1.0, 10)])
def test_analyser_reads_scenes_through_noise_blur_and_tint(image_size, noise, blur, tint):
    rng = np.random.default_rng(0)
    truths = scenes(300, seed=12)
    images = [degrade(render(scene, image_size), rng, noise, blur, tint) for scene in truths]
    accuracy = attribute_accuracy(images, truths)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_analyser_takes_arrays_and_finds_nothing_in_an_empty_image():
    scene = scenes(1)[0]
    assert analyse(np.asarray(render(scene, 64)))["objects"] == analyse(render(scene, 64))["objects"]
    assert analyse(Image.new("RGB", (64, 64), (40, 40, 40)))["objects"] == []
    with pytest.raises(ValueError, match="square"):
        analyse(np.zeros((32, 48, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least 32"):
        analyse(np.zeros((16, 16, 3), dtype=np.uint8))


def test_analyser_ignores_specks_and_splits_shapes_run_together_across_cells():
    square = ShapeObject("square", "red", "large", 1, 1)
    pixels = np.array(render(Scene((square,), "single"), 64))
    pixels[2:4, 2:4] = (30, 190, 60)  # a 4-pixel green speck in the top-left cell
    x0, y0, _, _ = square.bbox(64)
    pixels[y0 + 8, : x0 + 1] = (230, 30, 30)  # a red line from the image's left edge into the square
    found = analyse(pixels)["objects"]
    assert [(obj["color"], obj["shape"], obj["size"], obj["position"]) for obj in found][-1] == ("red", "square", "large", "center")
    assert "green" not in {obj["color"] for obj in found}
    assert {obj["position"] for obj in found} <= {"left", "center"}  # the line's piece in the left cell, at most


# -----------------------------------------------------------------------------
# captions


def test_parse_prompt_inverts_caption_for_every_layout():
    sampled = scenes(300, seed=13)
    assert {scene.layout for scene in sampled} == set(LAYOUTS)
    for scene in sampled:
        assert parse_prompt(caption(scene)) == expected_from_json(to_json(scene, 64))


def test_parse_prompt_examples_and_text_outside_the_grammar():
    assert parse_prompt("A large red circle  on the left") == {
        "layout": "single", "position": "left", "relation": None,
        "objects": [{"size": "large", "color": "red", "shape": "circle"}],
    }
    pair = parse_prompt("a small blue square to the right of a large green triangle")
    assert (pair["layout"], pair["relation"]) == ("pair", "right of")
    assert pair["objects"][1] == {"size": "large", "color": "green", "shape": "triangle"}
    row = "a small red circle, a large blue square and a small green diamond from left to right"
    assert parse_prompt(row.replace(",", " ,")) == parse_prompt(row) and parse_prompt(row)["layout"] == "row"
    for text in ("a red circle", "a large pink circle on the left", "two blue squares", "", row.replace(",", "")):
        with pytest.raises(ValueError, match="not a caption of the shapes grammar"):
            parse_prompt(text)


# -----------------------------------------------------------------------------
# match


def shapes(*objects: tuple[str, str, str, int, int]) -> dict:
    """An analysis result: (size, color, shape, row, col) per object."""
    return {"objects": [dict(zip(("size", "color", "shape", "row", "col"), obj)) for obj in objects]}


def verdicts(prompt: str, found: dict) -> set[str]:
    """The attributes `match` finds true."""
    return {name for name, ok in match(parse_prompt(prompt), found).items() if ok}


EVERYTHING = set(ATTRIBUTES)
PAIR = "a small red circle to the left of a large blue square"


def test_match_single_object_position_is_the_named_cell():
    assert verdicts("a large red circle at the top", shapes(("large", "red", "circle", 0, 1))) == EVERYTHING
    assert verdicts("a large red circle at the top", shapes(("large", "red", "circle", 0, 0))) == EVERYTHING - {"position", "all"}
    assert verdicts("a large red circle at the top", shapes(("small", "red", "circle", 0, 1))) == EVERYTHING - {"size", "all"}


def test_match_pair_relation_binds_objects_by_their_attributes():
    assert verdicts(PAIR, shapes(("small", "red", "circle", 2, 0), ("large", "blue", "square", 2, 2))) == EVERYTHING
    swapped_places = shapes(("small", "red", "circle", 2, 2), ("large", "blue", "square", 2, 0))
    assert verdicts(PAIR, swapped_places) == EVERYTHING - {"position", "all"}
    diagonal = shapes(("small", "red", "circle", 0, 0), ("large", "blue", "square", 2, 2))
    assert verdicts(PAIR, diagonal) == EVERYTHING - {"position", "all"}  # "left of" means the same row
    # colours and kinds all present, bound the wrong way round
    swapped_colours = shapes(("small", "blue", "circle", 1, 0), ("large", "red", "square", 1, 1))
    assert verdicts(PAIR, swapped_colours) == {"count", "color", "shape", "size", "position"}


def test_match_needs_exactly_the_stated_objects():
    extra = shapes(("small", "red", "circle", 1, 0), ("large", "blue", "square", 1, 2), ("small", "red", "circle", 0, 0))
    assert verdicts(PAIR, extra) == set()  # every multiset differs too
    assert verdicts(PAIR, shapes(("small", "red", "circle", 1, 0))) == set()
    assert verdicts("a large red circle in the center", {"objects": []}) == set()


def test_match_rows_and_columns_need_one_line_in_caption_order():
    prompt = "a small red circle, a small red square and a large green diamond from left to right"
    row = [("small", "red", "circle"), ("small", "red", "square"), ("large", "green", "diamond")]
    assert verdicts(prompt, shapes(*[(*obj, 0, col) for col, obj in enumerate(row)])) == EVERYTHING  # any row
    assert verdicts(prompt, shapes(*[(*obj, 2, 2 - col) for col, obj in enumerate(row)])) == EVERYTHING - {"position", "all"}
    assert verdicts(prompt, shapes(*[(*obj, col, col) for col, obj in enumerate(row)])) == EVERYTHING - {"position", "all"}
    column = prompt.replace("from left to right", "from top to bottom")
    assert verdicts(column, shapes(*[(*obj, index, 1) for index, obj in enumerate(row)])) == EVERYTHING


def test_match_repeated_objects_may_bind_either_way():
    prompt = "a large blue triangle above a large blue triangle"
    assert verdicts(prompt, shapes(("large", "blue", "triangle", 0, 1), ("large", "blue", "triangle", 2, 1))) == EVERYTHING


def test_a_scene_matches_its_own_caption_and_rarely_another():
    sampled = scenes(200, seed=14)
    for scene in sampled:
        assert all(match(parse_prompt(caption(scene)), to_json(scene, 64)).values())
    others = [match(parse_prompt(caption(a)), to_json(b, 64))["all"] for a, b in zip(sampled, sampled[1:])]
    assert np.mean(others) < 0.05


# -----------------------------------------------------------------------------
# the evaluation


def test_seen_prompts_are_synthetic_shapes_captions_and_held_out_ones_cycle():
    groups = evaluation_scenes(30, seed=5)
    dataset = SyntheticShapes(30, seed=5)
    assert [caption(scene) for scene in groups["seen"]] == [dataset[i].caption for i in range(30)]
    assert groups["held_out"][: len(HELD_OUT_SCENES)] == list(HELD_OUT_SCENES)
    assert groups["held_out"][len(HELD_OUT_SCENES)] == HELD_OUT_SCENES[0]


def test_held_out_captions_are_in_neither_the_quickstart_training_nor_validation_set():
    held_out = {caption(scene) for scene in HELD_OUT_SCENES}
    assert len(held_out) == len(HELD_OUT_SCENES)
    for seed, count in ((0, 20_000), (1, 5_000)):
        assert not held_out & {caption(scene) for scene in scenes(count, seed)}, seed


class Oracle:
    """A perfect prior for the evaluation's own prompts: it renders each prompt's scene; or,
    `ignore_prompt`, random scenes of the training distribution."""

    def __init__(self, scenes_by_caption: dict[str, Scene], image_size: int, ignore_prompt: bool = False):
        self.scenes, self.image_size, self.ignore_prompt = scenes_by_caption, image_size, ignore_prompt

    def generate(self, prompts, sampling=None, seed=0):
        rng = random.Random(seed)
        drawn = [sample_scene(rng) if self.ignore_prompt else self.scenes[prompt] for prompt in prompts]
        pixels = np.stack([np.asarray(render(scene, self.image_size)) for scene in drawn])  # (B, H, W, 3)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_a_perfect_prior_scores_one_and_one_that_ignores_captions_scores_chance():
    groups = evaluation_scenes(24, seed=3)
    by_caption = {caption(scene): scene for group in groups.values() for scene in group}
    perfect = evaluate_shapes(Oracle(by_caption, 64), 24, seed=3, batch_size=10)
    for group in ("seen", "held_out"):
        assert perfect[group]["fidelity"] == {name: 1.0 for name in ATTRIBUTES}
    ignoring = evaluate_shapes(Oracle(by_caption, 64, ignore_prompt=True), 24, seed=3, batch_size=10)
    assert ignoring["seen_all"] <= 0.1 and ignoring["chance_all"] <= 0.05
    assert ignoring["seen"]["fidelity"]["count"] < 0.7 and ignoring["seen"]["chance"]["count"] < 0.5


def test_evaluate_shapes_command_reports_fidelity_of_a_prior_checkpoint(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    from tessera.commands.cli import main

    prior = tiny_prior(tokenizer_dir)  # random weights: 32 px images of noise, fidelity near chance
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    fit.save_checkpoint(tmp_path / "prior.ckpt")
    out = tmp_path / "eval" / "shapes.json"
    argv = ["evaluate", "shapes", "--prior", str(tmp_path / "prior.ckpt"), "--num-samples", "12", "--seed", "7",
            "--cfg-scale", "2", "--top-k", "16", "--batch-size", "12", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (report["image_size"], report["num_samples"], report["seed"]) == (32, 12, 7)
    assert report["sampling"] == {"top_k": 16, "top_p": None, "temperature": 1.0, "cfg_scale": 2.0}
    for group in ("seen", "held_out"):
        assert report[group]["n"] == 12
        for block in ("fidelity", "analyser", "chance"):
            assert set(ATTRIBUTES) <= set(report[group][block])
            assert all(math.isfinite(value) and 0 <= value <= 1 for value in report[group][block].values())
        assert report[group]["analyser"]["all"] >= 0.98 and report[group]["analyser"]["exact"] >= 0.98
    assert sum(part["n"] for part in report["seen"]["fidelity_by_layout"].values()) == 12
    assert len(report["held_out"]["prompts"]) == len(HELD_OUT_SCENES)
    for name in ("seen_all", "seen_color_and_shape", "held_out_all", "held_out_color_and_shape", "analyser_all", "chance_all"):
        assert 0 <= report[name] <= 1
    with pytest.raises(SystemExit, match="holds no LLMTextImageModel"):
        main(argv + ["--captions"])


# -----------------------------------------------------------------------------
# captioning


class Reader:
    """A captioner for the evaluation's own scenes: it knows each render's caption and passes it
    through `edit` (the identity: a perfect captioner)."""

    image_size = 32

    def __init__(self, scenes: list[Scene], edit=lambda index, text: text):
        self.captions = {np.asarray(render(scene, self.image_size)).tobytes(): caption(scene) for scene in scenes}
        self.edit, self.seen = edit, 0

    def caption(self, images, sampling=None, seed=0):
        pixels = images.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        texts = [self.edit(self.seen + i, self.captions[image.tobytes()]) for i, image in enumerate(pixels)]
        self.seen += len(texts)
        return texts


def test_a_true_caption_scores_on_every_attribute_whichever_true_caption_it_is():
    scene = Scene((ShapeObject("circle", "red", "small", 1, 0), ShapeObject("square", "blue", "large", 1, 2)), "pair", "left of")
    texts = ["a small red circle to the left of a large blue square", "a large blue square to the right of a small red circle",
             "a small red circle to the right of a large blue square", "a small blue circle to the left of a large red square",
             "a small red circle", "two red circles"]
    verdicts, unparsed = judge_captions([scene] * len(texts), texts)
    assert verdicts[0] == verdicts[1] == {name: True for name in ATTRIBUTES}
    assert verdicts[2] == {**{name: True for name in ATTRIBUTES}, "position": False, "all": False}
    # the colours and kinds are there, but not bound to each other as stated
    assert verdicts[3] == {**{name: True for name in ATTRIBUTES}, "color_and_shape": False, "all": False}
    assert unparsed == [4, 5] and verdicts[4] == verdicts[5] == {name: False for name in ATTRIBUTES}
    with pytest.raises(ValueError, match="1 captions for 2 scenes"):
        judge_captions([scene, scene], texts[:1])


def test_a_perfect_captioner_scores_one_and_a_wrong_one_less_with_its_unparsed_captions_counted():
    groups = evaluation_scenes(12, seed=3)
    scenes_ = [scene for group in groups.values() for scene in group]
    perfect = evaluate_captions(Reader(scenes_), 12, seed=3, batch_size=5)
    for group in ("seen", "held_out"):
        assert perfect[group]["accuracy"] == {name: 1.0 for name in ATTRIBUTES} and perfect[group]["unparsed"] == 0
        assert perfect[group]["chance"]["all"] < 0.1
    assert perfect["seen"]["examples"][0] == {"caption": caption(groups["seen"][0]), "truth": caption(groups["seen"][0])}
    assert (perfect["seen_all"], perfect["held_out_unparsed"], perfect["decoding"]) == (1.0, 0, "greedy")

    def wrong(index, text):  # every fourth caption outside the grammar, every other one's first colour changed
        if index % 4 == 0:
            return text + " and more"
        first = next(word for word in text.split() if word in ("red", "orange", "yellow", "green", "blue", "purple"))
        return text.replace(first, "blue" if first != "blue" else "red", 1) if index % 2 else text

    report = evaluate_captions(Reader(scenes_, wrong), 12, seed=3, batch_size=5)
    for group in ("seen", "held_out"):
        accuracy = report[group]["accuracy"]
        assert report[group]["unparsed"] == 3
        assert accuracy["shape"] == accuracy["count"] == 0.75  # what parsed still names the right kinds
        assert accuracy["color"] == accuracy["all"] == 0.25  # a changed colour is never right
