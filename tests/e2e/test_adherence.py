"""The embedded model follows the prompt: videos made through the mesh, judged from their pixels.

Prompts are the first held-out ones of ``t2v.train.adherence`` (shape/colour/motion combinations the
model never saw in training), made at the defaults (64x64, 16 frames, 50 steps, guidance 9) through
the gateway; the checker reads the decoded MP4 and never the prompt. The thresholds sit below what
docs/model.md reports for these same prompts, so a model that stops following them fails here.
"""

from __future__ import annotations

import pytest

from t2v.train import adherence

pytestmark = pytest.mark.slow

PROMPTS = 8
# The shipped model (run 9) gets colour 8/8, shape 7/8 and motion 8/8 of these right (docs/model.md;
# chance for motion is 1 in 7). Runs 7-8, which took the direction from the seed, got 8, 7 and 5; the
# model before them 6, 6 and 1; random weights 1, 3 and 0.
MIN_RIGHT = {"colour": 7, "shape": 6, "motion": 7}


# DPM-Solver++ at 25 steps samples the model's zero-terminal-SNR schedule too (8, 7 and 8 right).
@pytest.mark.parametrize(("scheduler", "steps"), [("", 0), ("dpmsolver++", 25)], ids=["defaults", "dpmsolver-25"])
def test_the_embedded_model_follows_held_out_prompts(gateway_stage, scheduler: str, steps: int) -> None:
    chosen = adherence.cases("heldout", False, PROMPTS)
    result = adherence.measure(gateway_stage.address, chosen, clients=2, steps=steps, scheduler=scheduler)
    right = {attribute: sum(case[attribute] for case in result["cases"]) for attribute in MIN_RIGHT}
    report = "\n".join(f"{c['prompt']!r}: saw {c['saw']}" for c in result["cases"])
    for attribute, least in MIN_RIGHT.items():
        assert right[attribute] >= least, (
            f"{attribute} right in {right[attribute]} of {PROMPTS} videos (want >= {least}):\n{report}")

