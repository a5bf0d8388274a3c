"""Procedural scenes: simple shapes on a plain background, each with the prompt that describes it.

The grammar (every prompt [`sample_scene`] writes and [`parse_prompt`] reads):

```
scene    := group [relation group] " on a " colour " background"
group    := count " " colour " " shape["s"]         count: "a" | "two" | "three"
relation := " left of " | " right of " | " above " | " below "
```

e.g. `"two red circles left of a blue square on a yellow background"`. A scene has one group of 1 to 3 shapes or two
groups of 1 or 2 shapes each, in different colours, none in the background colour. The prompt fixes the layout up to
a small jitter ([`shape_centres`]): a group alone sits in the middle, and with a relation each group fills its half.

[`check_image`] judges any image against any prompt of the grammar, from pixels alone: every pixel is labelled with
its nearest palette colour; the background colour must label the most pixels (and at least 40 %), each group's colour
must form exactly as many blobs as the prompt counts, the first group must lie on the named side of the second, and
no colour the prompt does not name may form a blob. That is how the trained scene model and TeaCache's quality are
measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np


__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SHAPE_COLOURS",
    "Scene",
    "SceneCheck",
    "ShapeGroup",
    "check_image",
    "label_colours",
    "parse_prompt",
    "render_scene",
    "sample_scene",
    "scene_prompts",
    "shape_centres",
]

# Palette in RGB: distinct colours (at least 100 apart), so that a slightly blurred generated pixel still finds its own.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
BACKGROUND_COLOURS: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

# A pixel farther than this (RGB Euclidean) from every palette colour belongs to no colour (blurred edges).
_MAX_COLOUR_DISTANCE = 90.0
# Blobs smaller than this fraction of the image after a 1 px erosion are specks, not shapes (the smallest shape,
# a triangle of radius 5.8 px in 64 x 64, keeps about 1 % after erosion).
_MIN_BLOB_FRACTION = 0.004


@dataclass(frozen=True)
class ShapeGroup:
    r"""`count` shapes of one kind and colour, e.g. `ShapeGroup(2, "red", "circle")` for "two red circles"."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.count not in _COUNT_WORDS:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count!r}")
        if self.colour not in SHAPE_COLOURS:
            raise ValueError(f"shape colour must be one of {SHAPE_COLOURS}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")

    def describe(self) -> str:
        return f"{_COUNT_WORDS[self.count]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class Scene:
    r"""
    What a prompt asks for: one or two [`ShapeGroup`]s, how the first lies relative to the second, and a background.

    Args:
        groups (`tuple[ShapeGroup, ...]`):
            One group, or two groups of different colours.
        background (`str`):
            A colour of [`BACKGROUND_COLOURS`] that no group uses.
        relation (`str`, *optional*):
            One of [`RELATIONS`]; required with two groups, `None` with one.
    """

    groups: tuple[ShapeGroup, ...]
    background: str
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a scene has one or two groups, got {len(self.groups)}")
        if (len(self.groups) == 2) != (self.relation is not None):
            raise ValueError(f"two groups need a relation and one group none; got {len(self.groups)} and "
                             f"relation={self.relation!r}")
        if len(self.groups) == 2 and max(group.count for group in self.groups) > 2:
            raise ValueError(f"with two groups each has 1 or 2 shapes (each fills half the picture), got "
                             f"{[group.count for group in self.groups]}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        colours = [group.colour for group in self.groups]
        if len(set(colours)) != len(colours) or self.background in colours:
            raise ValueError(f"groups and background need different colours, got {colours} on {self.background!r}")
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"background must be one of {BACKGROUND_COLOURS}, got {self.background!r}")

    @property
    def prompt(self) -> str:
        text = self.groups[0].describe()
        if self.relation is not None:
            text += f" {self.relation} {self.groups[1].describe()}"
        return f"{text} on a {self.background} background"


def sample_scene(rng: np.random.Generator) -> Scene:
    r"""Draw a scene: one group (40 %) or two (60 %); then counts, colours, shapes, relation and background, each
    uniformly among the choices the grammar leaves."""
    two = rng.random() < 0.6
    colours = rng.permutation(SHAPE_COLOURS)[: 2 if two else 1]
    groups = tuple(
        ShapeGroup(int(rng.integers(1, 3 if two else 4)), str(colour), str(rng.choice(SHAPES))) for colour in colours
    )
    backgrounds = [colour for colour in BACKGROUND_COLOURS if colour not in colours]
    relation = str(rng.choice(RELATIONS)) if two else None
    return Scene(groups, str(rng.choice(backgrounds)), relation)


_GROUP = r"(a|two|three) (\w+) (circle|square|triangle)(s?)"
_PROMPT = re.compile(rf"^{_GROUP}(?: (left of|right of|above|below) {_GROUP})? on a (\w+) background")


def parse_prompt(prompt: str) -> Scene:
    r"""
    The [`Scene`] a prompt of the grammar asks for.

    Raises:
        `ValueError`: naming the prompt and the grammar, when it is not a prompt of the grammar.
    """
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a scene prompt; write e.g. 'two red circles left of a blue square on a yellow "
            f"background' in lower case with single spaces (counts a/two/three, colours {', '.join(SHAPE_COLOURS)}, "
            f"shapes {', '.join(SHAPES)}, relations {', '.join(RELATIONS)}, backgrounds "
            f"{', '.join(BACKGROUND_COLOURS)})."
        )
    words = match.groups()
    counts = {word: count for count, word in _COUNT_WORDS.items()}

    def group(count: str, colour: str, shape: str, plural: str) -> ShapeGroup:
        if (count != "a") != (plural == "s"):
            raise ValueError(f"{prompt!r}: '{count} {colour} {shape}{plural}' mixes singular and plural")
        return ShapeGroup(counts[count], colour, shape)

    groups = [group(*words[0:4])]
    if words[4] is not None:
        groups.append(group(*words[5:9]))
    return Scene(tuple(groups), words[9], words[4])


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int, supersample: int = 4) -> np.ndarray:
    # Coverage in [0, 1] per pixel from a supersampled grid, so edges are anti-aliased like a photo of a flat shape.
    step = 1.0 / supersample
    grid = (np.arange(size * supersample) + 0.5) * step  # sample centres in pixel units
    x, y = np.meshgrid(grid, grid)  # (size*s, size*s) each
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        half = radius * 0.85  # same area as the circle, about
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # isosceles triangle, apex up, base 2r, height 2r
        inside = (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    # (size*s, size*s) -> (size, s, size, s) -> (size, size)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


# Where shapes go, as data: every count has one arrangement, so a prompt fixes the layout up to a small jitter and the
# model's job is to draw what the words say (colour, shape, count, side), not to choose among many placements. The
# offsets are fractions of the picture from the group's centre; shapes of an arrangement are at least 0.4 apart
# (26 px at 64), twice the largest radius plus a clear gap, so counts are unambiguous for the model and the checks.
_ARRANGEMENTS: dict[tuple[str, int], tuple[tuple[float, float], ...]] = {
    # (where the group is, count) -> shape offsets (dx, dy); "whole": alone in the picture, "half": in one half,
    # laid out across it (the offsets are for a left/right half and get transposed for above/below)
    ("whole", 1): ((0.0, 0.0),),
    ("whole", 2): ((-0.2, 0.0), (0.2, 0.0)),
    ("whole", 3): ((0.0, -0.19), (-0.2, 0.17), (0.2, 0.17)),
    ("half", 1): ((0.0, 0.0),),
    ("half", 2): ((0.0, -0.22), (0.0, 0.22)),
}
# relation -> (centre of the first group, centre of the second), as fractions of the picture
_HALF_CENTRES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((0.25, 0.5), (0.75, 0.5)),
    "right of": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}
_RADIUS = (0.11, 0.13)  # shape radius range, fraction of the picture
_GROUP_JITTER = 0.03  # the group's centre moves up to this fraction of the picture
_SHAPE_JITTER = 0.015  # and each shape up to this, on each axis


def shape_centres(scene: Scene, rng: np.random.Generator | None = None) -> list[list[tuple[float, float]]]:
    r"""
    Per group, the centres `(x, y)` of its shapes as fractions of the picture.

    A group alone is arranged around the centre of the picture (one shape in the middle, two side by side, three in
    a triangle); with a relation, the first group fills the named half and the second the other half, two shapes of
    a group one behind the other across the half. `rng` adds the jitter [`render_scene`] draws with; `None` gives the
    exact arrangement.
    """
    if scene.relation is None:
        places = [("whole", (0.5, 0.5), False)]
    else:
        transpose = scene.relation in ("above", "below")
        places = [("half", centre, transpose) for centre in _HALF_CENTRES[scene.relation]]
    centres = []
    for group, (where, (cx, cy), transpose) in zip(scene.groups, places):
        if rng is not None:
            cx, cy = np.array((cx, cy)) + rng.uniform(-_GROUP_JITTER, _GROUP_JITTER, size=2)
        group_centres = []
        for dx, dy in _ARRANGEMENTS[where, group.count]:
            if transpose:
                dx, dy = dy, dx
            if rng is not None:
                dx, dy = np.array((dx, dy)) + rng.uniform(-_SHAPE_JITTER, _SHAPE_JITTER, size=2)
            group_centres.append((float(cx + dx), float(cy + dy)))
        centres.append(group_centres)
    return centres


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    r"""
    Draw a scene: an `(size, size, 3)` uint8 RGB image.

    Shapes sit where [`shape_centres`] puts them (with a jitter of up to 3 % of `size` per group and 1.5 % per
    shape) with a radius of 11 % to 13 % of `size`, anti-aliased on the plain background.
    """
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = COLOURS[scene.background]
    for group, centres in zip(scene.groups, shape_centres(scene, rng)):
        for cx, cy in centres:
            radius = rng.uniform(*_RADIUS) * size
            coverage = _shape_mask(group.shape, cx * size, cy * size, radius, size)[..., None]  # (size, size, 1)
            image = image * (1 - coverage) + np.asarray(COLOURS[group.colour], dtype=np.float64) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneCheck:
    r"""
    What [`check_image`] found. Each flag is one question about the picture; `counts` and `relation` are only
    meaningful when the colours were found.

    Args:
        background (`bool`): the background colour labels the most pixels, and at least 40 % of them.
        colours (`bool`): every group's colour forms at least one blob.
        counts (`bool`): every group's colour forms exactly as many blobs as the prompt counts.
        relation (`bool`): the first group's centre lies on the named side of the second's (`True` with one group).
        no_extra (`bool`): no colour the prompt does not name forms a blob.
        blobs (`dict[str, int]`): blobs found per palette colour (background excluded).
    """

    background: bool
    colours: bool
    counts: bool
    relation: bool
    no_extra: bool
    blobs: dict[str, int]

    @property
    def colours_and_counts(self) -> bool:
        r"""Dominant colours and shape counts right: background, every group's colour, and every count."""
        return self.background and self.colours and self.counts

    @property
    def faithful(self) -> bool:
        r"""Every check passed."""
        return self.colours_and_counts and self.relation and self.no_extra


def label_colours(image: np.ndarray) -> np.ndarray:
    r"""Per pixel, the index into `COLOURS` of the nearest palette colour, or -1 when none is within reach."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]  # (H, W, 3)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float64)  # (C, 3)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, C)
    labels = distance.argmin(axis=-1)
    labels[distance.min(axis=-1) > _MAX_COLOUR_DISTANCE] = -1
    return labels


def _erode(mask: np.ndarray) -> np.ndarray:
    # Keep pixels whose 4 neighbours are set too: removes the 1-2 px fringe where two colours blend into a third.
    padded = np.pad(mask, 1, constant_values=False)  # (H+2, W+2)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _blobs(mask: np.ndarray, min_area: int) -> list[tuple[float, float]]:
    # 4-connected components of a boolean mask by flood fill, after erosion; returns the centre (x, y) of each large
    # enough one.
    mask = _erode(mask)
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    centres = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pixels) >= min_area:
            ys, xs = zip(*pixels)
            centres.append((float(np.mean(xs)), float(np.mean(ys))))
    return centres


def scene_prompts(count: int, seed: int) -> list[str]:
    r"""The prompts of `count` scenes drawn with [`sample_scene`] from `numpy.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng).prompt for _ in range(count)]


def check_image(image: Any, prompt: str | Scene) -> SceneCheck:
    r"""
    Judge an image against a prompt of the grammar from its pixels alone.

    Args:
        image (`np.ndarray` or `PIL.Image.Image`):
            `(H, W, 3)` RGB, uint8 or 0..255 floats.
        prompt (`str` or [`Scene`]):
            The prompt the image was made for.

    Returns:
        [`SceneCheck`]
    """
    scene = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    labels = label_colours(np.asarray(image))
    names = list(COLOURS)
    min_area = max(4, round(_MIN_BLOB_FRACTION * labels.size))
    share = np.bincount(labels[labels >= 0].ravel(), minlength=len(names)) / labels.size
    background = int(share.argmax()) == names.index(scene.background) and share.max() >= 0.4
    blobs = {
        name: _blobs(labels == index, min_area) for index, name in enumerate(names) if name != scene.background
    }
    colours = all(blobs[group.colour] for group in scene.groups)
    counts = all(len(blobs[group.colour]) == group.count for group in scene.groups)
    relation = True
    if scene.relation is not None and colours:
        (ax, ay), (bx, by) = (np.mean(blobs[group.colour], axis=0) for group in scene.groups)
        relation = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[scene.relation]
    elif scene.relation is not None:
        relation = False
    named = {group.colour for group in scene.groups}
    no_extra = not any(found for name, found in blobs.items() if name not in named)
    return SceneCheck(
        background=bool(background),
        colours=bool(colours),
        counts=bool(counts),
        relation=bool(relation),
        no_extra=bool(no_extra),
        blobs={name: len(found) for name, found in blobs.items() if found},
    )
