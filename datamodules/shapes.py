"""Captioned synthetic scenes of flat-coloured shapes: quickstart data and a text-conditioning benchmark.

A scene places one to three shapes on a 3x3 grid of cells, one shape per cell, and its caption
follows a small grammar in which every object is a noun phrase "a SIZE COLOR SHAPE":

    single: NP on the left | on the right | at the top | at the bottom | in the center
    pair:   NP to the left of | to the right of | above | below NP   (from the first object's view)
    row:    NP, NP and NP from left to right                         (one row, columns 0, 1, 2)
    column: NP, NP and NP from top to bottom                         (one column, rows 0, 1, 2)

    "a large red circle on the left"
    "a small blue square to the left of a large green triangle"
    "a small red circle, a small blue square and a large green diamond from left to right"

Images are drawn so that a deterministic analyser can read every attribute back: exact colours
from a well-separated palette on a dark grey background with no antialiasing, each shape inside
its own cell with at least two background pixels between neighbours, and two sizes far apart.
A shape sits at the centre of its cell, or with `jitter` anywhere in the cell's slack: centred,
an object is one fixed pattern of pixels, and a tiny CPU-trained prior learns the binding of words
to objects instead of every sub-cell offset (the quickstart's caption fidelity 20% -> 50%). A scene
holds no pixels (jitter is a fraction of a cell's slack), so one scene renders at any `image_size`
from 32 up; `to_json` gives each object's bbox in pixels for one size.

Sample i of `SyntheticShapes` draws from its own `random.Random(f"{seed}:{i}")`, so a sample does
not depend on which shard, worker or order produced it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from datamodules.shard_writer import SourceSample

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated hues at least ~100 apart in RGB from each other and the background, so the
# nearest palette colour survives JPEG and a generator's colour drift.
COLORS = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 240, 30),
    "green": (30, 190, 60),
    "blue": (40, 100, 240),
    "purple": (160, 50, 210),
}
SIZES = ("small", "large")
BACKGROUND = (40, 40, 40)
LAYOUTS = ("single", "pair", "row", "column")
RELATIONS = ("left of", "right of", "above", "below")

GRID = 3  # cells per side
CELL_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# A single object sits in one of five cells, each named by a phrase of its own.
SINGLE_POSITIONS = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "center": (1, 1)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
ORDER_PHRASES = {"row": "from left to right", "column": "from top to bottom"}

SIZE_FRACTIONS = {"small": 0.5, "large": 0.85}  # of a cell's side
CELL_INSET = 1  # background pixels kept between a shape and its cell's edge, so neighbours never touch
MIN_IMAGE_SIZE = 32  # 10-pixel cells: small shapes 5 pixels wide, large 7, the least that tells them apart


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a grid cell; `jitter_x` and `jitter_y` in [0, 1) place it within the cell's slack."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    jitter_x: float = 0.5
    jitter_y: float = 0.5

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell (row {self.row}, col {self.col}) is outside the {GRID}x{GRID} grid")
        if not (0 <= self.jitter_x < 1 and 0 <= self.jitter_y < 1):
            raise ValueError(f"jitter must be in [0, 1), got ({self.jitter_x}, {self.jitter_y})")

    @property
    def position(self) -> str:
        return CELL_NAMES[self.row][self.col]

    def bbox(self, image_size: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), half-open: the shape fills image[y0:y1, x0:x1] to all four sides."""
        _check_image_size(image_size)
        cell = image_size // GRID  # every cell is at least this wide, so a size has one side length
        side = int(SIZE_FRACTIONS[self.size] * cell)
        side -= 1 - side % 2  # odd, so apexes and the diamond's corners fall on a pixel centre
        x0 = _place(self.col, self.jitter_x, side, image_size)
        y0 = _place(self.row, self.jitter_y, side, image_size)
        return x0, y0, x0 + side, y0 + side


@dataclass(frozen=True)
class Scene:
    """One to three objects in distinct cells; `relation` is set for a pair, from the first object's view."""

    objects: tuple[ShapeObject, ...]
    layout: str
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        cells = [(obj.row, obj.col) for obj in self.objects]
        if self.layout == "single":
            valid = len(cells) == 1 and self.relation is None and cells[0] in SINGLE_POSITIONS.values()
        elif self.layout == "pair":
            valid = (
                len(cells) == 2 and self.relation is not None and relation_between(*cells) == self.relation
            )
        else:
            valid = self.relation is None and cells in (_line_cells(self.layout, i) for i in range(GRID))
        if not valid:
            raise ValueError(
                f"cells {cells} and relation {self.relation!r} do not make a {self.layout!r} layout"
            )


def relation_between(first: tuple[int, int], second: tuple[int, int]) -> str | None:
    """Where cell `first` (row, col) lies from `second`, if they share a row or a column."""
    (row_a, col_a), (row_b, col_b) = first, second
    if row_a == row_b and col_a != col_b:
        return "left of" if col_a < col_b else "right of"
    if col_a == col_b and row_a != row_b:
        return "above" if row_a < row_b else "below"
    return None


def sample_scene(rng: random.Random, jitter: bool = False) -> Scene:
    """1 to 3 objects (uniform), layout and attributes uniform; the same `rng` draws give the same scene.

    Shapes sit at the centre of their cells, or with `jitter` anywhere in the cell's slack. The
    jitter is drawn either way, so a seed gives the same captions with it or without."""
    num_objects = rng.randint(1, 3)
    relation = None
    if num_objects == 1:
        layout = "single"
        cells = [SINGLE_POSITIONS[rng.choice(list(SINGLE_POSITIONS))]]
    elif num_objects == 2:
        layout, relation = "pair", rng.choice(RELATIONS)
        line = rng.randrange(GRID)  # the shared row or column
        near, far = sorted(rng.sample(range(GRID), 2))
        first, second = (near, far) if relation in ("left of", "above") else (far, near)
        horizontal = relation in ("left of", "right of")
        cells = [(line, first), (line, second)] if horizontal else [(first, line), (second, line)]
    else:
        layout = rng.choice(("row", "column"))
        cells = _line_cells(layout, rng.randrange(GRID))
    objects = tuple(
        ShapeObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(SIZES),
            row=row,
            col=col,
            jitter_x=_offset(rng, jitter),
            jitter_y=_offset(rng, jitter),
        )
        for row, col in cells
    )
    return Scene(objects, layout, relation)


def _offset(rng: random.Random, jitter: bool) -> float:
    offset = rng.random()
    return offset if jitter else 0.5


def caption(scene: Scene) -> str:
    """The scene in the grammar of the module docstring, e.g. "a large red circle on the left"."""
    phrases = [f"a {obj.size} {obj.color} {obj.shape}" for obj in scene.objects]
    if scene.layout == "single":
        return f"{phrases[0]} {POSITION_PHRASES[scene.objects[0].position]}"
    if scene.layout == "pair":
        return f"{phrases[0]} {RELATION_PHRASES[scene.relation]} {phrases[1]}"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]} {ORDER_PHRASES[scene.layout]}"


def to_json(scene: Scene, image_size: int) -> dict:
    """Structured attributes of the scene, with each object's half-open pixel bbox at `image_size`."""
    objects = [
        {
            "shape": obj.shape,
            "color": obj.color,
            "size": obj.size,
            "position": obj.position,
            "row": obj.row,
            "col": obj.col,
            "bbox": list(obj.bbox(image_size)),
        }
        for obj in scene.objects
    ]
    return {"layout": scene.layout, "relation": scene.relation, "objects": objects}


def render(scene: Scene, image_size: int) -> Image.Image:
    """An RGB image holding only BACKGROUND and the objects' exact COLORS (PIL draws without antialiasing)."""
    _check_image_size(image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox(image_size)
        right, bottom = x1 - 1, y1 - 1  # PIL's boxes and polygons include their last pixel
        cx, cy = (x0 + right) // 2, (y0 + bottom) // 2  # exact: the side is odd
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=fill)
    return image


class SyntheticShapes:
    """`num_samples` captioned scenes as a shard writer `Source`; sample i is the same wherever drawn.
    `jitter` moves shapes off their cells' centres (`sample_scene`); the captions stay the same."""

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0, jitter: bool = False) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be non-negative, got {num_samples}")
        _check_image_size(image_size)
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.jitter = jitter

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> SourceSample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is outside [0, {self.num_samples})")
        scene = sample_scene(random.Random(f"{self.seed}:{index}"), self.jitter)
        meta = {"source": "synthetic", "seed": self.seed, "index": index, "jitter": self.jitter}
        meta |= to_json(scene, self.image_size)
        return SourceSample(caption(scene), render(scene, self.image_size), meta)


def _line_cells(layout: str, line: int) -> list[tuple[int, int]]:
    """The (row, col) cells of a "row" or "column" layout along row or column `line`, in caption order."""
    return [(line, i) if layout == "row" else (i, line) for i in range(GRID)]


def _place(cell_index: int, jitter: float, side: int, image_size: int) -> int:
    """First pixel of a `side`-long shape in cell `cell_index` along one axis, `jitter` into the slack."""
    start, stop = cell_index * image_size // GRID, (cell_index + 1) * image_size // GRID
    slack = stop - start - side - 2 * CELL_INSET  # >= 0: a large side is at most 85% of the cell
    return start + CELL_INSET + int(jitter * (slack + 1))


def _check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} pixels so small shapes stay recognisable, "
            f"got {image_size}"
        )
