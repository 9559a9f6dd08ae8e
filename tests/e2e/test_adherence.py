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
# The shipped model (runs 7-8) gets colour 8/8, shape 7/8 and motion 5/8 of these right (docs/model.md;
# chance for motion is 1 in 7). The model it replaced got 6, 6 and 1; random weights 1, 3 and 0.
MIN_RIGHT = {"colour": 7, "shape": 6, "motion": 3}


def test_the_embedded_model_follows_held_out_prompts(gateway_stage) -> None:
    chosen = adherence.cases("heldout", False, PROMPTS)
    result = adherence.measure(gateway_stage.address, chosen, clients=2)
    right = {attribute: sum(case[attribute] for case in result["cases"]) for attribute in MIN_RIGHT}
    report = "\n".join(f"{c['prompt']!r}: saw {c['saw']}" for c in result["cases"])
    for attribute, least in MIN_RIGHT.items():
        assert right[attribute] >= least, (
            f"{attribute} right in {right[attribute]} of {PROMPTS} videos (want >= {least}):\n{report}")

