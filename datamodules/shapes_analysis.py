"""Reading a shapes-set image back into attributes, and judging it against its caption.

A deterministic analyser, no learned model: it inverts `datamodules.shapes.render` exactly and
reads images a generator makes through their blur, noise, tint and colour fringes.

    image (S, S, 3) --per pixel: its nearest colour segment, background -> palette colour, and
                      how much of the pixel that colour covers (a blurred edge is a mix)-->
    foreground: pixels at least half covered, within MAX_COLOR_DISTANCE of their segment
        --4-connected components, cut along the 3x3 grid's cell borders; pieces under
          MIN_AREA_FRACTION of a small shape are specks; one shape a cell-->
    per shape: position <- its cell; colour <- the most common colour among its pixels;
        kind and size <- the nearest (kind, size) template, each rendered alone at S and
        blurred by each of TEMPLATE_BLURS, compared as coverage windows (+-1 pixel shift)
        at the one blur that fits all shapes of the image best

On rendered images the analyser is exact at every size (the sharp templates are the shapes'
own pixels); tests/test_shapes_analysis.py measures it with noise, blur and tint.

`parse_prompt` inverts the caption grammar of datamodules/shapes.py; `expected_from_json` reads
the same expectation from a scene's `to_json`, which is preferred when a prompt has one.

What `match(expected, found)` means for a caption of n objects (n = 1, 2 or 3), per attribute;
an object is a shape `analyse` finds (one a cell), and every attribute below implies count:

    count     the image holds exactly n objects.
    color     the multiset of found colours equals the caption's ("a red circle and a red
              square" needs two red objects and nothing else).
    shape     the same for kinds (circle, square, triangle, diamond).
    size      the same for sizes (small, large).
    position  the spatial statement of the caption holds, with each found object bound to the
              noun phrase it agrees with most (most equal colours, kinds and sizes over the
              whole scene; any of the tied best bindings may satisfy the statement):
                single  the object is in the named cell ("on the left" is the middle row's left
                        cell, "at the top" the top row's middle cell, "in the center" the middle)
                pair    "A left of / right of B": A and B share a row, A's column is smaller /
                        larger; "A above / below B": they share a column, A's row is smaller /
                        larger (shapes.relation_between, the grammar's own meaning)
                row     the three share a row and stand in columns 0, 1, 2 in caption order
                column  the three share a column and stand in rows 0, 1, 2 in caption order
              Which row a "row" caption or which cells a pair uses are not stated, so not judged.
    color_and_shape
              one binding gives every noun phrase an object of its colour and kind: stricter
              than color and shape together (a blue circle and a red square have the colours
              and the kinds of "a red circle ... a blue square", but not bound right).
    all       one binding gives every noun phrase an object of its colour, kind and size and
              satisfies the spatial statement.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter

import numpy as np
from PIL import Image, ImageFilter

from datamodules.shapes import (
    BACKGROUND,
    CELL_NAMES,
    COLORS,
    GRID,
    MIN_IMAGE_SIZE,
    ORDER_PHRASES,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SHAPES,
    SINGLE_POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    relation_between,
    render,
)

ATTRIBUTES = ("count", "color", "shape", "size", "position", "color_and_shape", "all")
COLOR_NAMES = tuple(COLORS)
# RGB distance from the nearest segment (background -> palette colour) beyond which a pixel is
# no palette colour at all: the palette's colours lie >= 100 apart, a generator's flat regions
# drift far less than this, and a white or grey pixel lies further
MAX_COLOR_DISTANCE = 80.0
MIN_AREA_FRACTION = 0.3  # of the smallest shape's area (a small diamond) at the image's size: less is a speck
TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.1, 1.4)  # Gaussian sigmas in pixels: none, then as soft as a decoder's output

# the caption grammar of datamodules/shapes.py, one regular expression per layout
_NOUN_PHRASE = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_GRAMMAR = {
    "single": re.compile(rf"{_NOUN_PHRASE} ({'|'.join(POSITION_PHRASES.values())})"),
    "pair": re.compile(rf"{_NOUN_PHRASE} ({'|'.join(RELATION_PHRASES.values())}) {_NOUN_PHRASE}"),
    "row": re.compile(rf"{_NOUN_PHRASE}, {_NOUN_PHRASE} and {_NOUN_PHRASE} {ORDER_PHRASES['row']}"),
    "column": re.compile(rf"{_NOUN_PHRASE}, {_NOUN_PHRASE} and {_NOUN_PHRASE} {ORDER_PHRASES['column']}"),
}
_POSITION_OF_PHRASE = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_RELATION_OF_PHRASE = {phrase: name for name, phrase in RELATION_PHRASES.items()}


# -----------------------------------------------------------------------------
# what a caption asks for


def parse_prompt(caption: str) -> dict:
    """A caption of the shapes grammar -> {"layout", "position", "relation", "objects": [{size, color, shape}]}.

    "position" (a SINGLE_POSITIONS name) is set for a single object, "relation" for a pair;
    objects are in caption order. Raises ValueError for text outside the grammar. Case, runs of
    whitespace and a space before a comma (word-level and CLIP BPE tokenizers decode "a , b") do
    not matter.
    """
    text = " ".join(caption.strip().lower().split()).replace(" ,", ",")
    for layout, grammar in _GRAMMAR.items():
        if found := grammar.fullmatch(text):
            words = found.groups()
            position = relation = None
            if layout == "single":
                position, words = _POSITION_OF_PHRASE[words[3]], words[:3]
            elif layout == "pair":
                relation, words = _RELATION_OF_PHRASE[words[3]], words[:3] + words[4:]
            objects = [dict(zip(("size", "color", "shape"), words[i : i + 3])) for i in range(0, len(words), 3)]
            return {"layout": layout, "position": position, "relation": relation, "objects": objects}
    raise ValueError(f"not a caption of the shapes grammar (datamodules/shapes.py): {caption!r}")


def expected_from_json(scene: dict) -> dict:
    """The same expectation as `parse_prompt`, read from a scene's `to_json` (or a sample's meta)."""
    objects = [{name: obj[name] for name in ("size", "color", "shape")} for obj in scene["objects"]]
    position = scene["objects"][0]["position"] if scene["layout"] == "single" else None
    return {"layout": scene["layout"], "position": position, "relation": scene.get("relation"), "objects": objects}


# -----------------------------------------------------------------------------
# what an image shows


def analyse(
    image: Image.Image | np.ndarray,
    max_color_distance: float = MAX_COLOR_DISTANCE,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> dict:
    """The objects of a square shapes-set image, in reading order (by row, then column).

    Returns {"image_size": S, "blur": sigma, "objects": [{color, shape, size, row, col, position,
    bbox, area, centroid}]}, the object fields named as `to_json` names them; bbox (x0, y0, x1, y1)
    half-open and centroid (x, y) in pixels; blur the TEMPLATE_BLURS sigma the image was read at.
    Takes a PIL image or an (H, W, 3) uint8 array.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) RGB image, got shape {pixels.shape}")
    size = pixels.shape[0]
    templates = _templates(size)
    classes, coverage = color_classes(pixels, max_color_distance)  # (S, S) colour or -1; (S, S) in [0, 1]
    labels = connected_components(np.where(classes >= 0, 0, -1))  # (S, S) shape (any colour) or -1
    cells = _cell_pieces(labels, min_area_fraction * templates["min_area"])

    owner = np.full(size * size, -1)  # which cell's shape each pixel belongs to, as row * GRID + col
    for (row, col), flat in cells.items():
        owner[flat] = row * GRID + col
    owner = owner.reshape(size, size)
    objects, windows = [], []
    for (row, col), flat in sorted(cells.items()):
        ys, xs = np.divmod(flat, size)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        color = Counter(classes.ravel()[flat].tolist()).most_common(1)[0][0]  # a blurred edge may take a neighbouring hue
        # this shape alone: other shapes, and a pixel around them for their blurred edges, count as background
        own = owner == row * GRID + col
        alone = np.where(_dilate((owner >= 0) & ~own) & ~own, 0.0, coverage)
        windows.append(_window(alone, (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2, templates["window"] + 2))
        objects.append(
            {
                "color": COLOR_NAMES[color],
                "shape": None,  # kind and size below, for all shapes of the image at once
                "size": None,
                "row": row,
                "col": col,
                "position": CELL_NAMES[row][col],
                "bbox": [x0, y0, x1, y1],
                "area": int(flat.size),
                "centroid": [round(float(xs.mean()), 2), round(float(ys.mean()), 2)],
            }
        )
    blur, nearest = _nearest_templates(windows, templates)
    for obj, (kind, shape_size) in zip(objects, nearest):
        obj["shape"], obj["size"] = kind, shape_size
    return {"image_size": size, "blur": blur, "objects": objects}


def color_classes(pixels: np.ndarray, max_color_distance: float = MAX_COLOR_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> (H, W) index into COLORS of the colour covering each pixel (-1 for none),
    and (H, W) how much of each pixel its nearest colour covers, in [0, 1].

    A blurred edge pixel is a mix of one colour and the background: its coverage of colour c is
    its projection onto the segment from the background to c (0 at the background, 1 at c). A
    pixel's nearest colour is the one whose segment it lies nearest; the pixel belongs to it if it
    covers at least half of the pixel (the half-coverage contour of a blurred straight edge is the
    edge itself) and lies within `max_color_distance` of the segment. The background is the image's
    own (the median of the pixels that BACKGROUND's segments leave under a quarter covered), and
    each segment is shifted with it: a generator's tint of the whole image cancels.
    """
    pixels = pixels.astype(np.float32)
    directions = np.array(list(COLORS.values()), dtype=np.float32) - np.array(BACKGROUND, dtype=np.float32)  # (C, 3)
    classes, coverage = _nearest_segments(pixels - np.array(BACKGROUND, dtype=np.float32), directions, max_color_distance)
    background = np.median(pixels[coverage < 0.25], axis=0) if (coverage < 0.25).any() else BACKGROUND
    return _nearest_segments(pixels - background, directions, max_color_distance)


def _nearest_segments(offsets: np.ndarray, directions: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) pixels less the background, (C, 3) colours less the background -> classes, coverage."""
    coverage = np.clip(offsets @ directions.T / np.square(directions).sum(-1), 0, 1)  # (H, W, C)
    residual = np.linalg.norm(offsets[:, :, None, :] - coverage[..., None] * directions, axis=-1)  # (H, W, C)
    nearest = residual.argmin(-1)[..., None]  # (H, W, 1)
    coverage = np.take_along_axis(coverage, nearest, -1)[..., 0]
    close = np.take_along_axis(residual, nearest, -1)[..., 0] <= max_distance
    return np.where((coverage >= 0.5) & close, nearest[..., 0], -1), coverage


def connected_components(classes: np.ndarray) -> np.ndarray:
    """(H, W) classes (-1: none) -> (H, W) labels: 4-connected pixels of one class share a label
    (the smallest flat index among them), -1 elsewhere. Label propagation with pointer jumping."""
    height, width = classes.shape
    valid = classes >= 0
    none = height * width  # larger than every label
    labels = np.where(valid, np.arange(none).reshape(height, width), none)
    down = valid[1:] & (classes[1:] == classes[:-1])  # (H-1, W): pixel joined to the one above
    right = valid[:, 1:] & (classes[:, 1:] == classes[:, :-1])  # (H, W-1): joined to the one on its left
    while True:
        new = labels.copy()
        new[1:] = np.where(down, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:-1] = np.where(down, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(right, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        flat = np.append(new.ravel(), none)
        new = np.where(valid, np.minimum(new, flat[new]), none)  # jump to the label's own label
        if np.array_equal(new, labels):
            return np.where(valid, labels, -1)
        labels = new


def _cell_pieces(labels: np.ndarray, min_area: float) -> dict[tuple[int, int], np.ndarray]:
    """(row, col) -> flat pixel indices of the shape in that grid cell.

    Each component of at least `min_area` pixels is cut along the cell borders (blurred shapes in
    neighbouring cells may run together); a piece of at least `min_area` is a cell's, smaller
    pieces join their component's largest. Pieces in one cell join: the set draws one shape a cell.
    """
    size = labels.shape[0]
    cell_of = np.arange(size) * GRID // size  # the cell of each pixel row or column, as shapes._place lays them
    cells: dict[tuple[int, int], list[np.ndarray]] = {}
    order = np.argsort(labels, axis=None, kind="stable")
    sorted_labels = labels.ravel()[order]
    starts = np.flatnonzero(np.diff(sorted_labels, prepend=-2))
    for start, stop in zip(starts, [*starts[1:], sorted_labels.size]):
        if sorted_labels[start] < 0 or stop - start < min_area:
            continue
        flat = order[start:stop]
        ys, xs = np.divmod(flat, size)
        cell = cell_of[ys] * GRID + cell_of[xs]
        counts = np.bincount(cell, minlength=GRID * GRID)
        kept = counts >= min_area
        kept[counts.argmax()] = True
        home = np.where(kept[cell], cell, counts.argmax())
        for index in np.flatnonzero(kept):
            cells.setdefault(divmod(int(index), GRID), []).append(flat[home == index])
    return {cell: np.concatenate(parts) for cell, parts in cells.items()}


def _dilate(mask: np.ndarray) -> np.ndarray:
    """A bool mask grown by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    size_y, size_x = mask.shape
    return np.any([padded[dy : dy + size_y, dx : dx + size_x] for dy in range(3) for dx in range(3)], axis=0)


def _window(plane: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """The (side, side) square of `plane` centred on pixel (x, y), zero beyond the image; side odd."""
    half = side // 2
    padded = np.pad(plane, half)
    return padded[y : y + side, x : x + side]


def _nearest_templates(windows: list[np.ndarray], templates: dict) -> tuple[float, list[tuple[str, str]]]:
    """The (kind, size) of each object's coverage window: its nearest template, shifted by up to a
    pixel either way, at the one blur of TEMPLATE_BLURS that fits all objects of the image best (a
    decoder blurs a whole image alike); on ties the least blur."""
    if not windows:
        return 0.0, []
    side = templates["window"]
    stack = np.stack(windows)  # (N, side + 2, side + 2)
    shifted = np.stack([stack[:, dy : dy + side, dx : dx + side] for dy in range(3) for dx in range(3)], 1)  # (N, 9, side, side)
    # (blurs, objects, templates, shifts) -> least over shifts: squared coverage differences
    distances = np.square(shifted[None, :, None] - templates["coverage"][:, None, :, None]).sum((-1, -2)).min(-1)
    blur = int(np.argmin(distances.min(-1).sum(-1)))  # argmin keeps the first: the sharpest
    return TEMPLATE_BLURS[blur], [templates["names"][index] for index in distances[blur].argmin(-1)]


@functools.lru_cache(maxsize=16)
def _templates(image_size: int) -> dict:
    """Every (kind, size) drawn by `render` alone at `image_size`, sharp and blurred by each of
    TEMPLATE_BLURS, as coverage windows centred like an analysed object's: (blurs, kinds x sizes,
    window, window); with the least area of a sharp shape."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"the analyser reads images of at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    large = ShapeObject(SHAPES[0], COLOR_NAMES[0], "large", 1, 1).bbox(image_size)
    side = large[2] - large[0] + 4  # odd: two pixels of blur either side of the larger size
    names, coverages, areas = [], [], []
    for kind, size in itertools.product(SHAPES, SIZES):
        obj = ShapeObject(kind, COLOR_NAMES[0], size, 1, 1)
        image = render(Scene((obj,), "single"), image_size)
        names.append((kind, size))
        for blur in TEMPLATE_BLURS:
            blurred = image.filter(ImageFilter.GaussianBlur(blur)) if blur else image
            classes, coverage = color_classes(np.asarray(blurred))
            ys, xs = np.nonzero(classes == 0)  # COLOR_NAMES[0]
            if not blur:
                areas.append(len(ys))
            coverages.append(_window(coverage, (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2, side))
    coverage = np.stack(coverages).reshape(len(names), len(TEMPLATE_BLURS), side, side).transpose(1, 0, 2, 3)
    return {"names": names, "coverage": coverage, "window": side, "min_area": min(areas)}


# -----------------------------------------------------------------------------
# does the image show what the caption asks for


def match(expected: dict, found: dict) -> dict[str, bool]:
    """Per-attribute verdicts {count, color, shape, size, position, color_and_shape, all}, as the
    module docstring defines them.

    `expected` is `parse_prompt`'s or `expected_from_json`'s; `found` is `analyse`'s, or any
    {"objects": [{color, shape, size, row, col}]} such as a scene's `to_json`.
    """
    want, got = expected["objects"], found["objects"]
    verdict = {"count": len(got) == len(want)}
    for name in ("color", "shape", "size"):
        verdict[name] = Counter(obj[name] for obj in want) == Counter(obj[name] for obj in got)
    verdict |= {"position": False, "color_and_shape": False, "all": False}
    # binding[i] is the object standing for noun phrase i; none when the counts differ
    bindings = list(itertools.permutations(got)) if verdict["count"] else []
    agreement = [sum(a[k] == b[k] for a, b in zip(want, binding) for k in ("color", "shape", "size")) for binding in bindings]
    for binding, agree in zip(bindings, agreement):
        verdict["color_and_shape"] |= all(a["color"] == b["color"] and a["shape"] == b["shape"] for a, b in zip(want, binding))
        if _states(expected, binding):
            verdict["position"] |= agree == max(agreement)
            verdict["all"] |= agree == 3 * len(want)
    return {name: verdict[name] for name in ATTRIBUTES}


def _states(expected: dict, objects: tuple[dict, ...]) -> bool:
    """Whether objects, in caption order, stand where the caption says."""
    cells = [(obj["row"], obj["col"]) for obj in objects]
    layout = expected["layout"]
    if layout == "single":
        return cells[0] == SINGLE_POSITIONS[expected["position"]]
    if layout == "pair":
        return relation_between(*cells) == expected["relation"]
    rows, cols = [row for row, _ in cells], [col for _, col in cells]
    along, across = (cols, rows) if layout == "row" else (rows, cols)
    return along == list(range(GRID)) and len(set(across)) == 1
