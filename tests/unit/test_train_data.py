"""t2v.train.world (the captioned clip generator) and a CPU smoke run of t2v.train.train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t2v.train import world
from t2v.train.world import Spec

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_render_is_deterministic_and_seed_dependent() -> None:
    spec = Spec("square", "red", "spinning", "gray")
    a, b = world.render(spec, 7), world.render(spec, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, world.render(spec, 8))
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(5):
        s1, f1, c1 = world.sample(rng1)
        s2, f2, c2 = world.sample(rng2)
        assert (s1, c1) == (s2, c2) and np.array_equal(f1, f2)


@pytest.mark.parametrize("spec", [Spec("circle", "blue", "left", "black"), Spec("triangle", "yellow", "growing", "dark blue"),
                                  Spec("square", "white", "down", "dark green")])
def test_frames_shape_dtype_and_content(spec: Spec) -> None:
    frames = world.render(spec, 1)
    assert frames.shape == (world.FRAMES, world.SIZE, world.SIZE, 3) and frames.dtype == np.uint8
    corner = frames[0, 0, 0].astype(int)
    assert np.abs(corner - np.asarray(world.BACKGROUNDS[spec.background])).max() <= world.BACKGROUND_JITTER
    # The shape is drawn, in its colour, and stays inside the frame (the border is all background).
    fg = np.asarray(world.COLOURS[spec.colour])
    near_fg = np.abs(frames.astype(int) - fg).max(axis=-1) <= world.COLOUR_JITTER + 1
    assert near_fg.reshape(world.FRAMES, -1).sum(axis=1).min() > 20
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    assert (border == frames[0, 0, 0]).all()


def test_captions_name_colour_shape_motion_and_background() -> None:
    rng = np.random.default_rng(0)
    for spec in world.train_specs()[::7]:
        for paraphrase in (False, True):
            vocab = world.PARAPHRASE if paraphrase else world.TRAIN
            for _ in range(5):
                text = world.captions(spec, rng, paraphrase).lower()
                assert spec.colour in text
                assert any(word in text for word in vocab["shape"][spec.shape])
                assert any(phrase in text for phrase in vocab["motion"][spec.motion])
                if "background" in text or "backdrop" in text or "scene" in text or "field" in text:
                    assert spec.background in text
                assert " a orange" not in text and not text.startswith("a orange")


def test_several_phrasings_and_disjoint_paraphrases() -> None:
    spec = Spec("circle", "red", "left", "black")
    rng = np.random.default_rng(0)
    seen = {world.captions(spec, rng).lower() for _ in range(200)}
    assert len(seen) >= 10
    assert "a red circle moving left on a black background" in world.all_captions(spec)
    train_all = set(world.all_captions(spec))
    para_all = set(world.all_captions(spec, paraphrase=True))
    assert seen <= train_all and not (train_all & para_all)
    # No motion phrase of the paraphrase set is a training phrase.
    for motion in world.MOTIONS:
        assert not set(world.TRAIN["motion"][motion]) & set(world.PARAPHRASE["motion"][motion])


def test_heldout_combinations_never_in_training() -> None:
    held = set(world.HELDOUT_COMBOS)
    train = {spec.combo for spec in world.train_specs()}
    assert held and not (held & train)
    assert {spec.combo for spec in world.heldout_specs()} == held
    assert train | held == set(world.all_combos())
    assert abs(len(held) / len(world.all_combos()) - world.HELDOUT_FRACTION) < 0.02
    # Every attribute pair of a held-out combination is still seen in training.
    pairs = {(s, c) for s, c, _ in train} | {(s, m) for s, _, m in train} | {(c, m) for _, c, m in train}
    for s, c, m in held:
        assert {(s, c), (s, m), (c, m)} <= pairs
    rng = np.random.default_rng(0)
    assert all(world.sample_spec(rng, "train").combo not in held for _ in range(2000))
    assert world.HELDOUT_COMBOS == world._heldout()            # the split is deterministic


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="spin"):
        Spec("circle", "red", "spinning", "black")
    with pytest.raises(ValueError, match="colour"):
        Spec("circle", "pink", "left", "black")
    assert not any(s.shape == "circle" and s.motion == "spinning" for s in world.train_specs())


@pytest.mark.slow
def test_smoke_training_writes_a_loadable_model_folder_and_continuing_keeps_its_schedule(tmp_path: Path) -> None:
    """A smoke training (with --zero-terminal-snr, as the shipped model was trained) writes a folder the
    services load, with its v-prediction schedule (the services sample with the folder's schedule); a
    training --init-from that folder keeps the schedule. (The plain epsilon path runs in the torchrun test.)"""
    import torch
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from t2v.modelgen import ZERO_TERMINAL_SNR_CONFIG

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out, second = tmp_path / "model", tmp_path / "second"
    for args in (["--zero-terminal-snr", "--out", str(out)], ["--init-from", str(out), "--out", str(second)]):
        run = subprocess.run([sys.executable, "-m", "t2v.train.train", "--smoke", *args], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "[unet] step" in run.stdout and "clips/s" in run.stdout
        assert ("[vae] step" in run.stdout) == ("--init-from" not in args)    # a continued training keeps its VAE
    for part in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "training.json"):
        assert (out / part).is_file(), part
    for folder in (out, second):
        saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert {k: saved[k] for k in ZERO_TERMINAL_SNR_CONFIG} == ZERO_TERMINAL_SNR_CONFIG
        assert saved["_class_name"] == "DDIMScheduler"

    unet = UNet3DConditionModel.from_pretrained(out / "unet")
    vae = AutoencoderKL.from_pretrained(out / "vae")
    text = CLIPTextModel.from_pretrained(out / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert unet.config.sample_size * 8 == world.SIZE and unet.config.cross_attention_dim == text.config.hidden_size
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.scaling_factor != 0.18215
    with torch.no_grad():
        ids = tokenizer(["a red circle moving left"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = text(ids)[0]
        latents = torch.randn(1, 4, 2, 8, 8)
        assert unet(latents, 10, encoder_hidden_states=states).sample.shape == latents.shape
        assert vae.decode(latents[:, :, 0]).sample.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_two_process_training_through_torchrun_keeps_one_model(tmp_path: Path) -> None:
    """The data-parallel path (t2v.train.distributed) on two CPU processes with gloo: both ranks step
    in lockstep to the end (a parted step count hangs, parted weights fail the check at the end)."""
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "t2v.train.train", "--smoke", "--checkpoint-every", "0.001", "--out", str(out)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "processes 2" in run.stdout and "[unet] checkpoint of step 1" in run.stdout
    summary = json.loads((out / "training.json").read_text())
    assert summary["processes"] == 2 and summary["unet_steps"] == 3 and "checkpoint" not in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
