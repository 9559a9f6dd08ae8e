"""Turn OpenAI CLIP's original BPE file into the vocab.json + merges.txt that CLIPTokenizer loads.

Why: the embedded model must tokenize exactly like the real text-to-video-ms-1.7b (49408 tokens,
the same ids), but no hub can be reached here. The original CLIP merges ship inside the
``open_clip_torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``); this script rebuilds the
Hugging Face files from them with the same recipe as CLIP's ``simple_tokenizer.py``.

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python scripts/clip_bpe_to_hf.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# CLIP keeps 49152 - 256 - 2 merges: 256 byte tokens, 256 byte+</w> tokens, merges, 2 specials.
_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}


def convert(bpe_gz: Path, out_dir: Path) -> int:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"{bpe_gz} holds {len(merges)} merges, expected {_NUM_MERGES} pairs: is it CLIP's BPE file?")
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    return len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="tokenizer folder to write")
    args = parser.parse_args()
    print(f"wrote {convert(args.bpe_gz, args.out_dir)} tokens to {args.out_dir}")


if __name__ == "__main__":
    main()
