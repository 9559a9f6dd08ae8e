"""Decide colour, shape and motion of a clip FROM ITS PIXELS ONLY (the prompt is never read).

This is the adherence judge for the embedded model: generate a video from a prompt built from a
``world.Spec``, then ask ``check(frames, spec)`` whether the pixels show that colour, shape and
motion. It is calibrated on ``world.render`` clips (tests/unit/test_checker.py: >= 98% per attribute)
and is deliberately simple, so its failures are easy to read:

* background: the most common colour of the border pixels (quantised to 16 levels per channel, then
  the mean of the border pixels in that bin, so a slightly noisy model output still has one);
* foreground mask: pixels farther than ``MASK_DISTANCE`` (RGB) from the background, per frame;
* colour: per-channel median of the foreground pixels over all frames -> nearest ``world.COLOURS``;
* shape: rotation- and scale-invariant compactness ``area / (pi * r_max^2)``, r_max the farthest mask
  pixel from the centroid: circle ~1.0, square 2/pi ~0.64, equilateral triangle ~0.41 (median over
  frames); this works for spinning and tilted shapes, where the bounding-box fill ratio does not;
* motion: growing / shrinking when the area changes by more than ``AREA_RATIO`` between the first and
  last quarter of the clip; else left / right / up / down when the centroid moves more than
  ``MIN_TRAVEL`` pixels (the larger axis wins); else spinning when the centroid-aligned masks of some
  frame and the first frame overlap less than ``SPIN_IOU`` (the shape turned); else "still".

Guesses that match nothing are "none" (no foreground) or "still" (no motion), which fail every check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from t2v.train.world import COLOURS, Spec

MASK_DISTANCE = 60.0      # RGB distance from the background that counts as foreground
MIN_PIXELS = 6            # fewer foreground pixels in a frame than this: the frame has no shape
AREA_RATIO = 1.8          # last/first area above this = growing, below 1/this = shrinking
MIN_TRAVEL = 8.0          # centroid displacement (px) that counts as moving
SPIN_IOU = 0.85           # an aligned mask overlap below this = the shape turned
CIRCLE_MIN, SQUARE_MIN = 0.775, 0.53  # compactness: circle > 0.775 > square > 0.53 > triangle (midpoints)


@dataclass(frozen=True)
class Guess:
    """What the pixels show; ``details`` holds the measurements behind each decision."""

    shape: str
    colour: str
    motion: str
    background_rgb: tuple[int, int, int]
    details: dict


def background_colour(frames: np.ndarray) -> np.ndarray:
    """The most common colour of the border pixels of all frames (float RGB)."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    border = border.reshape(-1, 3).astype(np.int32)
    bins = border // 16
    keys = bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    mode = values[np.argmax(counts)]
    return border[keys == mode].mean(axis=0)


def foreground_masks(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[F, H, W] bool: pixels far enough from the background colour."""
    distance = np.linalg.norm(frames.astype(np.float32) - background.astype(np.float32), axis=-1)
    return distance > MASK_DISTANCE


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.asarray([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - rgb[None].astype(np.float32), axis=1)))]


def _frame_stats(mask: np.ndarray) -> tuple[float, float, float, float]:
    """area, centroid x, centroid y, compactness area / (pi r_max^2) of one mask."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cx, cy = float(xs.mean()), float(ys.mean())
    r_max = float(np.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).max())) + 0.5   # to the pixel's edge
    return area, cx, cy, area / (np.pi * r_max * r_max)


def _aligned_iou(a: np.ndarray, b: np.ndarray, shift: tuple[int, int]) -> float:
    """IoU of mask ``a`` with mask ``b`` rolled by ``shift`` (dy, dx) (b's centroid onto a's)."""
    b = np.roll(b, shift, axis=(0, 1))
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def classify(frames: np.ndarray) -> Guess:
    """[F, H, W, 3] uint8 frames -> the shape, colour and motion they show."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected [frames, height, width, 3] frames, got shape {frames.shape}")
    background = background_colour(frames)
    masks = foreground_masks(frames, background)
    present = [i for i in range(len(masks)) if masks[i].sum() >= MIN_PIXELS]
    bg = tuple(int(v) for v in background.round())
    if len(present) < max(2, len(masks) // 2):
        return Guess("none", "none", "none", bg, {"frames_with_shape": len(present)})

    colour_rgb = np.median(frames[masks], axis=0)
    colour = nearest_colour(colour_rgb)

    stats = np.asarray([_frame_stats(masks[i]) for i in present])
    area, cx, cy, compact = stats.T
    compactness = float(np.median(compact))
    shape = "circle" if compactness > CIRCLE_MIN else "square" if compactness > SQUARE_MIN else "triangle"

    quarter = max(1, len(present) // 4)
    area_ratio = float(area[-quarter:].mean() / area[:quarter].mean())
    dx = float(cx[-quarter:].mean() - cx[:quarter].mean())
    dy = float(cy[-quarter:].mean() - cy[:quarter].mean())
    first = masks[present[0]]
    ious = []
    for k, i in enumerate(present[1:], start=1):
        shift = (round(cy[0] - cy[k]), round(cx[0] - cx[k]))
        ious.append(_aligned_iou(first, masks[i], shift))
    min_iou = float(min(ious)) if ious else 1.0

    if area_ratio > AREA_RATIO:
        motion = "growing"
    elif area_ratio < 1 / AREA_RATIO:
        motion = "shrinking"
    elif max(abs(dx), abs(dy)) > MIN_TRAVEL:
        motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    elif min_iou < SPIN_IOU:
        motion = "spinning"
    else:
        motion = "still"
    details = {"colour_rgb": [float(v) for v in colour_rgb], "compactness": compactness, "area_ratio": area_ratio,
                   "dx": dx, "dy": dy, "min_aligned_iou": min_iou, "frames_with_shape": len(present)}
    return Guess(shape, colour, motion, bg, details)


def check(frames: np.ndarray, spec: Spec) -> dict[str, bool]:
    """Whether the pixels show ``spec``'s colour, shape and motion (the background is not judged)."""
    guess = classify(frames)
    return {"colour": guess.colour == spec.colour, "shape": guess.shape == spec.shape,
            "motion": guess.motion == spec.motion}


def accuracy(clips: list[tuple[np.ndarray, Spec]]) -> dict[str, float]:
    """Fraction of clips whose colour, shape and motion (and all three) pass ``check``."""
    totals = {"colour": 0, "shape": 0, "motion": 0, "all": 0}
    for frames, spec in clips:
        result = check(frames, spec)
        for key, ok in result.items():
            totals[key] += ok
        totals["all"] += all(result.values())
    return {key: value / max(1, len(clips)) for key, value in totals.items()}
