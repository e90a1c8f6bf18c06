import itertools
import json
import math
import pickle
import random
import re
import tarfile

import numpy as np
import pytest

from datamodules.shapes import (
    BACKGROUND,
    COLORS,
    LAYOUTS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    SyntheticShapes,
    caption,
    render,
    sample_scene,
    to_json,
)
from datamodules.shard_writer import write_shards

NOUN_PHRASE = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
CAPTION_GRAMMAR = {
    "single": re.compile(rf"{NOUN_PHRASE} (on the left|on the right|at the top|at the bottom|in the center)"),
    "pair": re.compile(rf"{NOUN_PHRASE} (to the left of|to the right of|above|below) {NOUN_PHRASE}"),
    "row": re.compile(rf"{NOUN_PHRASE}, {NOUN_PHRASE} and {NOUN_PHRASE} from left to right"),
    "column": re.compile(rf"{NOUN_PHRASE}, {NOUN_PHRASE} and {NOUN_PHRASE} from top to bottom"),
}
SIZES_TO_RENDER = [32, 33, 64, 100, 256]
PHRASE_MEANING = {
    "on the left": "left",
    "on the right": "right",
    "at the top": "top",
    "at the bottom": "bottom",
    "in the center": "center",
    "to the left of": "left of",
    "to the right of": "right of",
    "above": "above",
    "below": "below",
}


def parse_caption(text: str) -> dict:
    """Inverts the caption grammar: layout, relation or position, and (size, color, shape) per object."""
    for layout, grammar in CAPTION_GRAMMAR.items():
        if match := grammar.fullmatch(text):
            words = match.groups()
            if layout == "single":
                return {"layout": layout, "position": PHRASE_MEANING[words[3]], "objects": [words[:3]]}
            if layout == "pair":
                relation = PHRASE_MEANING[words[3]]
                return {"layout": layout, "relation": relation, "objects": [words[:3], words[4:]]}
            return {"layout": layout, "objects": [words[i : i + 3] for i in range(0, 9, 3)]}
    raise AssertionError(f"caption outside the grammar: {text!r}")


def scenes(count: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(random.Random(f"{seed}:{index}")) for index in range(count)]


def pixels(scene: Scene, image_size: int) -> np.ndarray:
    return np.asarray(render(scene, image_size))  # (H, W, 3) uint8


def color_mask(image: np.ndarray, color: str) -> np.ndarray:
    return (image == COLORS[color]).all(axis=-1)  # (H, W) bool


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    forward = SyntheticShapes(8, seed=3)
    backward = [SyntheticShapes(8, seed=3)[index] for index in reversed(range(8))][::-1]
    for index, again in enumerate(backward):
        sample = forward[index]
        assert sample.caption == again.caption
        assert sample.meta == again.meta
        assert np.array_equal(np.asarray(sample.image), np.asarray(again.image))


def test_different_seeds_give_different_samples():
    seed_0, seed_1 = SyntheticShapes(20, seed=0), SyntheticShapes(20, seed=1)
    assert [seed_0[i].caption for i in range(20)] != [seed_1[i].caption for i in range(20)]
    assert any(seed_0[i].image.tobytes() != seed_1[i].image.tobytes() for i in range(20))


def test_shapes_are_centred_in_their_cells_unless_jittered_and_captions_do_not_change():
    centred, jittered = SyntheticShapes(40, image_size=32, seed=0), SyntheticShapes(40, image_size=32, seed=0, jitter=True)
    assert [centred[i].caption for i in range(40)] == [jittered[i].caption for i in range(40)]
    boxes = {"centred": set(), "jittered": set()}
    for index in range(40):
        for name, dataset in (("centred", centred), ("jittered", jittered)):
            boxes[name] |= {(o["size"], o["row"], o["col"], tuple(o["bbox"])) for o in dataset[index].meta["objects"]}
    # centred: one box per size and cell; jittered: several
    assert len(boxes["centred"]) == len({box[:3] for box in boxes["centred"]})
    assert len(boxes["jittered"]) > len({box[:3] for box in boxes["jittered"]})
    assert jittered[0].meta["jitter"] and not centred[0].meta["jitter"]


def test_caption_examples_follow_the_grammar():
    red_circle = ShapeObject("circle", "red", "large", 1, 0)
    assert caption(Scene((red_circle,), "single")) == "a large red circle on the left"
    pair = Scene(
        (ShapeObject("square", "blue", "small", 0, 0), ShapeObject("triangle", "green", "large", 0, 2)),
        "pair",
        "left of",
    )
    assert caption(pair) == "a small blue square to the left of a large green triangle"
    row = Scene(
        (
            ShapeObject("circle", "red", "small", 2, 0),
            ShapeObject("square", "blue", "small", 2, 1),
            ShapeObject("diamond", "green", "large", 2, 2),
        ),
        "row",
    )
    expected = "a small red circle, a small blue square and a large green diamond from left to right"
    assert caption(row) == expected


def test_every_caption_parses_back_to_its_scene():
    for scene in scenes(300):
        parsed = parse_caption(caption(scene))
        attributes = to_json(scene, 64)
        assert parsed["layout"] == attributes["layout"]
        words = [(obj["size"], obj["color"], obj["shape"]) for obj in attributes["objects"]]
        assert parsed["objects"] == words
        if scene.layout == "single":
            assert parsed["position"] == attributes["objects"][0]["position"]
        if scene.layout == "pair":
            assert parsed["relation"] == attributes["relation"]


def test_relation_and_order_match_the_cells():
    for scene in scenes(300):
        if scene.layout == "pair":
            first, second = [(obj.row, obj.col) for obj in scene.objects]
            expected = {"left of": first[1] < second[1], "right of": first[1] > second[1]}
            expected |= {"above": first[0] < second[0], "below": first[0] > second[0]}
            assert expected[scene.relation]
        if scene.layout == "row":
            assert [obj.col for obj in scene.objects] == [0, 1, 2]
            assert len({obj.row for obj in scene.objects}) == 1
        if scene.layout == "column":
            assert [obj.row for obj in scene.objects] == [0, 1, 2]
            assert len({obj.col for obj in scene.objects}) == 1


@pytest.mark.parametrize("image_size", SIZES_TO_RENDER)
def test_image_is_flat_background_and_object_colours_each_filling_its_bbox(image_size):
    for scene in scenes(50):
        image = pixels(scene, image_size)
        assert image.shape == (image_size, image_size, 3)
        palette = {BACKGROUND} | {COLORS[obj.color] for obj in scene.objects}
        assert {tuple(color) for color in image.reshape(-1, 3).tolist()} <= palette
        covered = np.zeros(image.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox(image_size)
            inside = color_mask(image, obj.color)[y0:y1, x0:x1]
            # the bbox is tight: the shape reaches all four of its sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert (image[~covered] == BACKGROUND).all()


@pytest.mark.parametrize("image_size", SIZES_TO_RENDER)
def test_objects_never_overlap_or_touch_and_stay_inside_the_image(image_size):
    for scene in scenes(300):
        boxes = [obj.bbox(image_size) for obj in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
        for a, b in itertools.combinations(boxes, 2):
            gap_x = max(a[0], b[0]) - min(a[2], b[2])
            gap_y = max(a[1], b[1]) - min(a[3], b[3])
            assert max(gap_x, gap_y) >= 2  # at least two background pixels between neighbours


@pytest.mark.parametrize("image_size", SIZES_TO_RENDER)
def test_large_shapes_are_larger_than_small_ones_at_every_size(image_size):
    small = ShapeObject("square", "red", "small", 1, 1).bbox(image_size)
    large = ShapeObject("square", "red", "large", 1, 1).bbox(image_size)
    assert large[2] - large[0] > small[2] - small[0]


@pytest.mark.parametrize("size", SIZES)
def test_the_four_shapes_differ_in_pixels_even_at_32(size):
    masks = set()
    for shape in SHAPES:
        obj = ShapeObject(shape, "red", size, 1, 1)
        x0, y0, x1, y1 = obj.bbox(32)
        masks.add(color_mask(pixels(Scene((obj,), "single"), 32), "red")[y0:y1, x0:x1].tobytes())
    assert len(masks) == len(SHAPES)


def test_image_size_below_32_raises():
    scene = scenes(1)[0]
    with pytest.raises(ValueError, match="at least 32"):
        render(scene, 31)
    with pytest.raises(ValueError, match="at least 32"):
        SyntheticShapes(4, image_size=16)


def test_scene_rejects_cells_that_contradict_its_layout():
    left, right = ShapeObject("circle", "red", "large", 1, 0), ShapeObject("circle", "blue", "large", 1, 2)
    with pytest.raises(ValueError, match="do not make a 'pair' layout"):
        Scene((left, right), "pair", "right of")
    with pytest.raises(ValueError, match="do not make a 'single' layout"):
        Scene((ShapeObject("circle", "red", "large", 0, 0),), "single")
    with pytest.raises(ValueError, match="color must be one of"):
        ShapeObject("circle", "pink", "large", 1, 1)


def test_palette_colours_are_well_separated_from_each_other_and_the_background():
    colors = [*COLORS.values(), BACKGROUND]
    assert min(math.dist(a, b) for a, b in itertools.combinations(colors, 2)) >= 100


def test_every_shape_colour_size_and_layout_occurs():
    sampled = scenes(500)
    objects = [obj for scene in sampled for obj in scene.objects]
    assert {obj.shape for obj in objects} == set(SHAPES)
    assert {obj.color for obj in objects} == set(COLORS)
    assert {obj.size for obj in objects} == set(SIZES)
    assert {scene.layout for scene in sampled} == set(LAYOUTS)
    assert {len(scene.objects) for scene in sampled} == {1, 2, 3}


def test_meta_names_source_seed_index_and_json_attributes():
    sample = SyntheticShapes(5, image_size=32, seed=7)[4]
    assert sample.meta["source"] == "synthetic"
    assert (sample.meta["seed"], sample.meta["index"]) == (7, 4)
    assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    assert json.loads(json.dumps(sample.meta)) == sample.meta
    assert {"shape", "color", "size", "position", "row", "col", "bbox"} <= set(sample.meta["objects"][0])


@pytest.mark.parametrize("index", [-1, 5])
def test_index_outside_the_dataset_raises_index_error(index):
    with pytest.raises(IndexError):
        SyntheticShapes(5)[index]


def test_dataset_survives_pickling_for_worker_processes():
    dataset = SyntheticShapes(4, image_size=32, seed=2)
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy) == 4 and copy[3].meta == dataset[3].meta


def test_writes_shards_whose_json_holds_the_scene(tmp_path):
    dataset = SyntheticShapes(6, image_size=32)
    report = write_shards(dataset, tmp_path, samples_per_shard=4, image_format="png")
    assert report.samples == 6 and not report.skipped
    with tarfile.open(tmp_path / "00001.tar") as tar:
        record = json.load(tar.extractfile("000011.json"))
    assert record["index"] == 5 and record["caption"] == dataset[5].caption
