"""t2v.train.checker: colour, shape and motion decided from pixels, right on world clips, and able to fail."""

from __future__ import annotations


import numpy as np
import pytest

from t2v.train import checker, world
from t2v.train.world import Spec

ALL_SPECS = world.train_specs() + world.heldout_specs()


def _clips(n: int, seed: int) -> list[tuple[np.ndarray, Spec]]:
    rng = np.random.default_rng(seed)
    specs = [ALL_SPECS[int(i)] for i in rng.integers(len(ALL_SPECS), size=n)]
    return [(world.render(spec, int(rng.integers(2**31))), spec) for spec in specs]


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, Spec]]:
    return _clips(200, seed=123)


def test_classifies_generated_clips(clips) -> None:
    acc = checker.accuracy(clips)
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.98 and acc["motion"] >= 0.98, acc


def test_every_attribute_value_is_recognised() -> None:
    # One clip per (shape, colour, motion, background): every value of every attribute, every background.
    for spec in ALL_SPECS[::3]:
        guess = checker.classify(world.render(spec, 5))
        assert (guess.shape, guess.colour, guess.motion) == (spec.shape, spec.colour, spec.motion), (spec, guess)


def _other(values, value: str, spec_shape: str | None = None) -> list[str]:
    return [v for v in values if v != value and not (spec_shape == "circle" and v == "spinning")]


def test_fails_on_another_colour_shape_or_motion(clips) -> None:
    for frames, spec in clips[:60]:
        for colour in _other(world.COLOURS, spec.colour):
            assert checker.check(frames, Spec(spec.shape, colour, spec.motion, spec.background)) == \
                {"colour": False, "shape": True, "motion": True}
        for shape in _other(world.SHAPES, spec.shape):
            if shape == "circle" and spec.motion == "spinning":
                continue
            assert not checker.check(frames, Spec(shape, spec.colour, spec.motion, spec.background))["shape"]
        for motion in _other(world.MOTIONS, spec.motion, spec.shape):
            result = checker.check(frames, Spec(spec.shape, spec.colour, motion, spec.background))
            assert result == {"colour": True, "shape": True, "motion": False}


def test_reversed_clip_reverses_the_motion() -> None:
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "growing": "shrinking",
                "shrinking": "growing"}
    for motion, other in opposite.items():
        spec = Spec("triangle", "green", motion, "black")
        frames = world.render(spec, 11)[::-1]
        assert checker.check(frames, spec)["motion"] is False
        assert checker.classify(frames).motion == other


def test_still_or_empty_clips_fail_every_motion() -> None:
    frames = world.render(Spec("square", "orange", "spinning", "gray"), 3)
    still = np.repeat(frames[:1], world.FRAMES, axis=0)
    guess = checker.classify(still)
    assert guess.motion == "still" and guess.shape == "square" and guess.colour == "orange"
    assert not any(checker.check(still, Spec("square", "orange", m, "gray"))["motion"] for m in world.MOTIONS)

    empty = np.zeros_like(frames) + np.asarray(world.BACKGROUNDS["gray"], np.uint8)
    assert checker.check(empty, Spec("square", "orange", "spinning", "gray")) == \
        {"colour": False, "shape": False, "motion": False}


def test_noise_is_not_a_shape() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (world.FRAMES, world.SIZE, world.SIZE, 3), dtype=np.uint8)
    assert not all(checker.check(noise, Spec("circle", "red", "left", "black")).values())


def test_recoloured_pixels_change_the_colour_and_only_that() -> None:
    spec = Spec("circle", "red", "up", "black")
    frames = world.render(spec, 4)
    recoloured = frames[..., [2, 1, 0]]         # red (225, 35, 35) -> blue-ish (35, 35, 225)
    guess = checker.classify(recoloured)
    assert guess.colour == "blue" and guess.shape == "circle" and guess.motion == "up"


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="frames"):
        checker.classify(np.zeros((16, 64, 64), np.uint8))
