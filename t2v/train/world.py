"""A small visual world of captioned clips: one shape, one colour, one motion, one background.

Every clip is ``FRAMES`` x ``SIZE`` x ``SIZE`` x 3 uint8, drawn with numpy only (anti-aliased by a
signed distance: a pixel's coverage is ``clip(0.5 - distance, 0, 1)``) and fully determined by its
``Spec`` and an integer seed. About 1 ms a clip on one core.

Captions come from two disjoint template sets: ``TRAIN`` phrasings (used for training) and
``PARAPHRASE`` phrasings (never used for training, for a paraphrase test set). A held-out split of
(shape, colour, motion) combinations (``HELDOUT_FRACTION`` of them) never appears in
``train_specs()``: it measures compositional generalisation. It is chosen so that every pair of
attributes it contains still appears in training (e.g. held-out "red square spinning" leaves
"red square", "red ... spinning" and "square spinning" in the training set).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

FRAMES = 16
SIZE = 64

SHAPES = ("circle", "square", "triangle")
# Foreground colours, RGB. Kept far apart (>= ~100 in RGB) so a nearest-colour decision is robust.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 90, 250),
    "yellow": (245, 225, 40),
    "white": (245, 245, 245),
    "purple": (160, 50, 210),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (8, 8, 8),
    "gray": (110, 110, 110),
    "dark blue": (12, 18, 80),
    "dark green": (12, 60, 24),
}
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking", "spinning")
COLOUR_JITTER = 12        # +- per channel, per clip
BACKGROUND_JITTER = 6

HELDOUT_FRACTION = 0.15
HELDOUT_SEED = 20240917


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    motion: str
    background: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {tuple(COLOURS)}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; choose one of {MOTIONS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {tuple(BACKGROUNDS)}")
        if self.shape == "circle" and self.motion == "spinning":
            raise ValueError("a spinning circle looks still; circles do not spin in this world")

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.motion)


# ---------------------------------------------------------------------------------------------- split

def all_combos() -> list[tuple[str, str, str]]:
    """Every valid (shape, colour, motion), in a fixed order."""
    return [(s, c, m) for s, c, m in itertools.product(SHAPES, COLOURS, MOTIONS)
            if not (s == "circle" and m == "spinning")]


def _pairs(combo: tuple[str, str, str]) -> list[tuple]:
    s, c, m = combo
    return [("sc", s, c), ("sm", s, m), ("cm", c, m)]


def _heldout() -> tuple[tuple[str, str, str], ...]:
    combos = all_combos()
    target = round(HELDOUT_FRACTION * len(combos))
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(combos))
    coverage: dict[tuple, int] = {}
    for combo in combos:
        for pair in _pairs(combo):
            coverage[pair] = coverage.get(pair, 0) + 1
    held: list[tuple[str, str, str]] = []
    for index in order:
        combo = combos[index]
        if all(coverage[pair] > 1 for pair in _pairs(combo)):   # every pair stays in training
            held.append(combo)
            for pair in _pairs(combo):
                coverage[pair] -= 1
            if len(held) == target:
                break
    return tuple(sorted(held))


HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = _heldout()


def train_combos() -> list[tuple[str, str, str]]:
    held = set(HELDOUT_COMBOS)
    return [combo for combo in all_combos() if combo not in held]


def _with_backgrounds(combos: list[tuple[str, str, str]]) -> list[Spec]:
    return [Spec(s, c, m, b) for (s, c, m) in combos for b in BACKGROUNDS]


def train_specs() -> list[Spec]:
    """Every Spec whose (shape, colour, motion) is not held out, each background included."""
    return _with_backgrounds(train_combos())


def heldout_specs() -> list[Spec]:
    """Every Spec whose (shape, colour, motion) is held out (never seen in training)."""
    return _with_backgrounds(list(HELDOUT_COMBOS))


_SPLITS: dict[str, list[Spec]] = {}


def sample_spec(rng: np.random.Generator, split: str = "train") -> Spec:
    """A uniformly random Spec of ``split`` ("train" or "heldout")."""
    if split not in _SPLITS:
        _SPLITS[split] = {"train": train_specs, "heldout": heldout_specs}[split]()
    specs = _SPLITS[split]
    return specs[int(rng.integers(len(specs)))]


# -------------------------------------------------------------------------------------------- drawing

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5   # pixel centres


def _regular_polygon_sdf(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, angle: np.ndarray,
                         sides: int) -> np.ndarray:
    """[F, H, W] signed distance (approx., exact on edges) to a regular polygon, per frame.

    ``radius`` is the circumradius; ``angle`` rotates the first vertex from straight up.
    """
    apothem = radius * np.cos(np.pi / sides)
    dx = _XX[None] - cx[:, None, None]
    dy = _YY[None] - cy[:, None, None]
    dist = np.full(dx.shape, -np.inf, dtype=np.float32)
    for k in range(sides):
        # Outward normal of edge k (between vertices k and k+1); vertex 0 points up (-y) at angle 0.
        theta = angle + (2 * k + 1) * np.pi / sides
        nx, ny = np.sin(theta), -np.cos(theta)
        np.maximum(dist, dx * nx[:, None, None] + dy * ny[:, None, None] - apothem[:, None, None], out=dist)
    return dist


def _circle_sdf(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    dx = _XX[None] - cx[:, None, None]
    dy = _YY[None] - cy[:, None, None]
    return np.sqrt(dx * dx + dy * dy) - radius[:, None, None]


def _jitter(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)


# Radius (circumradius for polygons) -> the shape's "visual radius" is about the same for all shapes.
_SIZE_SCALE = {"circle": 1.0, "square": 1.25, "triangle": 1.45}


def trajectory(spec: Spec, rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE):
    """Per-frame centre x, centre y, radius and rotation angle (radians) for ``spec``."""
    t = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    scale = _SIZE_SCALE[spec.shape]
    angle0 = rng.uniform(-0.12, 0.12)                # small tilt, still reads as "square"/"triangle"
    angle = np.full(frames, angle0, np.float32)
    if spec.motion in ("left", "right", "up", "down"):
        r = rng.uniform(6.0, 9.0)
        margin = r * scale + 2
        travel = rng.uniform(0.6, 0.95) * (size - 2 * margin)    # >= 20 px on a 64 px frame
        start = rng.uniform(margin, size - margin - travel)
        along = start + travel * t
        if spec.motion in ("left", "up"):
            along = along[::-1]
        across = np.full(frames, rng.uniform(margin, size - margin), np.float32)
        cx, cy = (along, across) if spec.motion in ("left", "right") else (across, along)
        radius = np.full(frames, r, np.float32)
    else:
        if spec.motion in ("growing", "shrinking"):
            small, big = rng.uniform(4.0, 5.5), rng.uniform(12.0, 15.0)
            radius = small + (big - small) * t
            if spec.motion == "shrinking":
                radius = radius[::-1]
            r_max = big
        else:  # spinning
            r_max = rng.uniform(9.0, 13.0)
            radius = np.full(frames, r_max, np.float32)
            turn = np.deg2rad(rng.uniform(45.0, 80.0)) * rng.choice([-1.0, 1.0])
            angle = (angle0 + turn * t).astype(np.float32)
        margin = r_max * scale + 2
        cx = np.full(frames, rng.uniform(margin, size - margin), np.float32)
        cy = np.full(frames, rng.uniform(margin, size - margin), np.float32)
    return (cx.astype(np.float32), cy.astype(np.float32), (radius * scale).astype(np.float32),
            angle.astype(np.float32))


def render(spec: Spec, seed: int) -> np.ndarray:
    """[FRAMES, SIZE, SIZE, 3] uint8 frames of ``spec``; the same seed gives the same clip."""
    rng = np.random.default_rng(seed)
    cx, cy, radius, angle = trajectory(spec, rng)
    if spec.shape == "circle":
        sdf = _circle_sdf(cx, cy, radius)
    else:
        sdf = _regular_polygon_sdf(cx, cy, radius, angle, 4 if spec.shape == "square" else 3)
    coverage = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    fg = _jitter(COLOURS[spec.colour], COLOUR_JITTER, rng)
    bg = _jitter(BACKGROUNDS[spec.background], BACKGROUND_JITTER, rng)
    frames = bg + coverage * (fg - bg)
    return (frames + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- captions

# Two disjoint vocabularies: TRAIN phrasings are used for training; PARAPHRASE ones only for testing.
TRAIN = {
    "shape": {"circle": ["circle", "ball", "disc"], "square": ["square", "box"],
              "triangle": ["triangle", "triangular shape"]},
    "motion": {
        "left": ["moving left", "sliding to the left", "going left"],
        "right": ["moving right", "sliding to the right", "going right"],
        "up": ["moving up", "rising", "going up"],
        "down": ["moving down", "falling", "going down"],
        "growing": ["growing", "getting bigger"],
        "shrinking": ["shrinking", "getting smaller"],
        "spinning": ["spinning", "rotating"],
    },
    "background": ["on a {bg} background", "against a {bg} backdrop", "over a {bg} background"],
    "templates": [
        "a {colour} {shape} {motion} {background}",
        "{colour} {shape} {motion}, {background}",
        "a {colour} {shape} {motion}",
        "{background}, a {colour} {shape} {motion}",
    ],
}
PARAPHRASE = {
    "shape": {"circle": ["round dot", "orb"], "square": ["square block", "cube-like tile"],
              "triangle": ["three-sided shape", "triangle figure"]},
    "motion": {
        "left": ["travelling towards the left edge", "heading leftwards"],
        "right": ["travelling towards the right edge", "heading rightwards"],
        "up": ["climbing upwards", "heading to the top"],
        "down": ["sinking downwards", "heading to the bottom"],
        "growing": ["swelling in size", "expanding"],
        "shrinking": ["contracting", "becoming tiny"],
        "spinning": ["turning in place", "twirling around"],
    },
    "background": ["with a {bg} scene behind it", "over a plain {bg} field"],
    "templates": [
        "there is a {colour} {shape} {motion} {background}",
        "{background}: one {colour} {shape}, {motion}",
        "watch the {colour} {shape} {motion}",
    ],
}


def _articles(text: str) -> str:
    """'a orange' -> 'an orange'; a background template may start the caption ('On a ...')."""
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)


def captions(spec: Spec, rng: np.random.Generator, paraphrase: bool = False) -> str:
    """One plain-English caption of ``spec``, phrasing drawn from ``rng`` (TRAIN or PARAPHRASE set)."""
    vocab = PARAPHRASE if paraphrase else TRAIN

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    background = pick(vocab["background"]).format(bg=spec.background)
    text = pick(vocab["templates"]).format(
        colour=spec.colour, shape=pick(vocab["shape"][spec.shape]),
        motion=pick(vocab["motion"][spec.motion]), background=background)
    text = _articles(text)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def all_captions(spec: Spec, paraphrase: bool = False) -> list[str]:
    """Every lower-case caption the template set can give for ``spec``."""
    vocab = PARAPHRASE if paraphrase else TRAIN
    out = []
    for template, shape, motion, bg in itertools.product(
            vocab["templates"], vocab["shape"][spec.shape], vocab["motion"][spec.motion], vocab["background"]):
        out.append(_articles(template.format(colour=spec.colour, shape=shape, motion=motion,
                                             background=bg.format(bg=spec.background))))
    return sorted(set(out))


def sample(rng: np.random.Generator, split: str = "train", paraphrase: bool = False) -> tuple[Spec, np.ndarray, str]:
    """A random (spec, frames, caption) of ``split``; everything drawn from ``rng``."""
    spec = sample_spec(rng, split)
    seed = int(rng.integers(2**63 - 1))
    return spec, render(spec, seed), captions(spec, rng, paraphrase)
