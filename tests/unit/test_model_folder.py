"""The embedded model folder, services.common.model_folder, t2v.modelgen and scripts/clip_bpe_to_hf.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.common.model_folder import (ModelFolderError, model_part, resolve_device, resolve_dtype,
                                          vae_scale_factor)

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = REPO_ROOT / "models" / "t2v-world"
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# Keys a save adds or that training sets (the VAE's scaling_factor is measured on its latents).
VERSION_KEYS = {"_diffusers_version", "transformers_version", "dtype", "scaling_factor"}


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VERSION_KEYS}


# -- the committed folder ---------------------------------------------------------------------------

def test_model_index_has_the_text_to_video_ms_layout() -> None:
    index = json.loads((EMBEDDED / "model_index.json").read_text())
    assert index["_class_name"] == "TextToVideoSDPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["unet"] == ["diffusers", "UNet3DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for part in COMPONENTS:
        assert (EMBEDDED / part).is_dir(), f"models/t2v-world/{part}/ is missing"


@pytest.mark.parametrize("part, files", [
    ("text_encoder", ["config.json", "model.safetensors"]),
    ("unet", ["config.json", "diffusion_pytorch_model.safetensors"]),
    ("vae", ["config.json", "diffusion_pytorch_model.safetensors"]),
    ("scheduler", ["scheduler_config.json"]),
    ("tokenizer", ["vocab.json", "merges.txt", "tokenizer_config.json"]),
])
def test_component_files_are_present(part: str, files: list[str]) -> None:
    for name in files:
        assert (EMBEDDED / part / name).is_file(), f"models/t2v-world/{part}/{name} is missing"


def test_component_classes_match_the_index() -> None:
    assert json.loads((EMBEDDED / "unet" / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
    assert json.loads((EMBEDDED / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert json.loads((EMBEDDED / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    assert json.loads((EMBEDDED / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(EMBEDDED / "tokenizer")


def test_tokenizer_is_the_real_clip_bpe(tokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 77


def test_tokenizer_truncates_to_77(tokenizer) -> None:
    ids = tokenizer("cat " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_committed_vocab_is_rebuilt_from_committed_merges() -> None:
    clip = _load_script("clip_bpe_to_hf")
    lines = (EMBEDDED / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split()) for line in lines[1:]]
    assert len(merges) == 49152 - 256 - 2
    vocab = json.loads((EMBEDDED / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == clip.build_vocab(merges)


# -- services.common.model_folder -------------------------------------------------------------------

def test_model_part_returns_the_component_folder() -> None:
    for part in COMPONENTS:
        assert model_part(EMBEDDED, part) == EMBEDDED / part
    assert model_part(str(EMBEDDED), "unet") == EMBEDDED / "unet"


def _assert_sentence(message: str, *words: str) -> None:
    assert len(message.split()) >= 5, f"not a sentence: {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_model_part_refuses_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelFolderError) as info:
        model_part(missing, "unet")
    _assert_sentence(str(info.value), str(missing), "does not exist")


def test_model_part_refuses_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"")
    with pytest.raises(ModelFolderError):
        model_part(file, "unet")


def test_model_part_refuses_a_folder_without_model_index(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelFolderError) as info:
        model_part(tmp_path, "unet")
    _assert_sentence(str(info.value), str(tmp_path), "model_index.json")


@pytest.fixture
def copied_index(tmp_path: Path) -> Path:
    shutil.copy(EMBEDDED / "model_index.json", tmp_path / "model_index.json")
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        (tmp_path / part).mkdir()
    return tmp_path


def test_model_part_refuses_a_folder_without_unet_dir(copied_index: Path) -> None:
    with pytest.raises(ModelFolderError) as info:
        model_part(copied_index, "unet")
    _assert_sentence(str(info.value), str(copied_index), "'unet'")
    assert model_part(copied_index, "vae") == copied_index / "vae"


def test_model_part_refuses_a_component_missing_from_the_index(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline",
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelFolderError) as info:
        model_part(tmp_path, "unet")
    _assert_sentence(str(info.value), "'unet'")


def _vae_folder(root: Path, config: object) -> Path:
    """A model folder holding only model_index.json and vae/config.json (``config``, as JSON or raw text)."""
    shutil.copy(EMBEDDED / "model_index.json", root / "model_index.json")
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return root


def test_vae_scale_factor_of_the_embedded_model_is_8() -> None:
    assert len(json.loads((EMBEDDED / "vae" / "config.json").read_text())["block_out_channels"]) == 4
    assert vae_scale_factor(EMBEDDED) == 8 and vae_scale_factor(str(EMBEDDED)) == 8


@pytest.mark.parametrize("blocks, factor", [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)])
def test_vae_scale_factor_is_2_to_the_blocks_minus_1(tmp_path: Path, blocks: int, factor: int) -> None:
    folder = _vae_folder(tmp_path, {"_class_name": "AutoencoderKL", "block_out_channels": [32] * blocks})
    assert vae_scale_factor(folder) == factor


def test_vae_scale_factor_agrees_with_diffusers(tmp_path: Path) -> None:
    """The number diffusers' pipelines compute from a loaded VAE, for a real 2-block AutoencoderKL."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    shutil.copy(EMBEDDED / "model_index.json", tmp_path / "model_index.json")
    vae.save_pretrained(tmp_path / "vae")
    assert vae_scale_factor(tmp_path) == 2 ** (len(vae.config.block_out_channels) - 1) == 2
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 4, 5, 3)).sample.shape[-2:] == (10, 6)


@pytest.mark.parametrize("config, words", [
    ("{not json", "cannot be read as JSON"),
    ({"_class_name": "AutoencoderKL"}, "block_out_channels"),
    ({"block_out_channels": []}, "block_out_channels"),
    ({"block_out_channels": 4}, "block_out_channels"),
    ([1, 2], "block_out_channels"),
])
def test_vae_scale_factor_refuses_a_config_without_blocks(tmp_path: Path, config: object, words: str) -> None:
    folder = _vae_folder(tmp_path, config)
    with pytest.raises(ModelFolderError) as info:
        vae_scale_factor(folder)
    _assert_sentence(str(info.value), str(folder / "vae" / "config.json"), words)


def test_vae_scale_factor_refuses_a_folder_without_a_vae(copied_index: Path) -> None:
    shutil.rmtree(copied_index / "vae")
    with pytest.raises(ModelFolderError) as info:
        vae_scale_factor(copied_index)
    _assert_sentence(str(info.value), "'vae'")


def test_the_gateway_reads_the_factor_and_the_default_size_from_the_folder(tmp_path: Path) -> None:
    from services.gateway.app import model_default_size, model_scale_factor

    assert (model_scale_factor(str(EMBEDDED)), model_default_size(str(EMBEDDED))) == (8, 8 * 8)
    folder = _vae_folder(tmp_path, {"block_out_channels": [16, 16]})
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 16}))
    assert (model_scale_factor(str(folder)), model_default_size(str(folder))) == (2, 32)
    # No model folder at all (a gateway without the volume): diffusers' 8 and 256, as before.
    assert (model_scale_factor(str(tmp_path / "none")), model_default_size(str(tmp_path / "none"))) == (8, 256)


def test_resolve_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("name", ["float64", "fp16", "int8", ""])
def test_resolve_dtype_refuses_unknown_names(name: str) -> None:
    with pytest.raises(ModelFolderError) as info:
        resolve_dtype(name, torch.device("cpu"))
    _assert_sentence(str(info.value), repr(name), "float16")


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_resolve_device_refuses_cuda_without_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelFolderError, match="cuda"):
        resolve_device("cuda")


# -- t2v.modelgen -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generated_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from t2v.modelgen import make_model

    out = tmp_path_factory.mktemp("modelgen") / "m"
    assert make_model("world", out) == out
    return out


def test_make_model_writes_the_layout(generated_model: Path) -> None:
    index = json.loads((generated_model / "model_index.json").read_text())
    assert _config(generated_model / "model_index.json") == _config(EMBEDDED / "model_index.json")
    assert index["_class_name"] == "TextToVideoSDPipeline"
    for part in COMPONENTS:
        assert model_part(generated_model, part).is_dir()


def test_make_model_components_load(generated_model: Path) -> None:
    from diffusers import UNet3DConditionModel
    from transformers import CLIPTextModel

    unet = UNet3DConditionModel.from_pretrained(generated_model / "unet")
    assert isinstance(unet, UNet3DConditionModel)
    assert unet.config.in_channels == 4 and unet.config.sample_size == 8
    text_encoder = CLIPTextModel.from_pretrained(generated_model / "text_encoder")
    assert isinstance(text_encoder, CLIPTextModel)
    assert text_encoder.config.vocab_size == 49408
    assert text_encoder.config.hidden_size == unet.config.cross_attention_dim


def test_make_model_matches_the_committed_configs(generated_model: Path) -> None:
    assert _config(generated_model / "unet" / "config.json") == _config(EMBEDDED / "unet" / "config.json")
    for path in ("vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert _config(generated_model / path) == _config(EMBEDDED / path), f"{path} differs from models/t2v-world"


def test_make_model_copies_the_tokenizer(generated_model: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        assert (generated_model / "tokenizer" / name).read_bytes() == (EMBEDDED / "tokenizer" / name).read_bytes()


def test_make_model_refuses_an_unknown_preset(tmp_path: Path) -> None:
    from t2v.modelgen import make_model

    with pytest.raises(ValueError, match="huge") as info:
        make_model("huge", tmp_path / "m")
    assert "tiny" in str(info.value) and "full" in str(info.value)
    assert not (tmp_path / "m").exists()


# -- scripts/clip_bpe_to_hf.py ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_script() -> ModuleType:
    return _load_script("clip_bpe_to_hf")


def test_bytes_to_unicode_is_a_bijection_of_256_bytes(clip_script: ModuleType) -> None:
    table = clip_script.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(len(c) == 1 and c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[ord(" ")] == "Ġ"  # GPT-2/CLIP's well-known mapping of the space byte


def test_build_vocab_on_two_merges(clip_script: ModuleType) -> None:
    vocab = clip_script.build_vocab([("i", "n"), ("t", "h")])
    assert len(vocab) == 256 + 256 + 2 + 2
    assert sorted(vocab.values()) == list(range(len(vocab)))
    by_id = {i: token for token, i in vocab.items()}
    assert by_id[len(vocab) - 2] == "<|startoftext|>"
    assert by_id[len(vocab) - 1] == "<|endoftext|>"
    assert vocab["in"] == 512 and vocab["th"] == 513
    assert vocab["a</w>"] == vocab["a"] + 256
    assert vocab["!"] == 0


def test_convert_writes_vocab_and_merges(clip_script: ModuleType, tmp_path: Path, monkeypatch) -> None:
    import gzip

    bpe = tmp_path / "bpe.txt.gz"
    # A file with 2 merges where CLIP keeps 48894: shrink the expected count to test the recipe.
    bpe.write_bytes(gzip.compress("\"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h".encode()))
    monkeypatch.setattr(clip_script, "_NUM_MERGES", 2)
    count = clip_script.convert(bpe, tmp_path / "tok")
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert count == len(vocab) == 256 + 256 + 2 + 2
    assert (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\ni n\nt h\n"


def test_convert_refuses_a_truncated_bpe_file(clip_script: ModuleType, tmp_path: Path) -> None:
    import gzip

    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress("header\ni n\nt h\n".encode()))
    with pytest.raises(SystemExit, match="expected 48894"):
        clip_script.convert(bpe, tmp_path / "tok")
