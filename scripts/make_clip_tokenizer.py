"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in
``dreambooth_jax/assets/clip_tokenizer`` from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

The ``.gz`` ships inside several wheels (e.g. ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in
open-clip-torch). The derivation is the one of OpenAI's ``SimpleTokenizer``: 256 byte tokens,
the same with ``</w>``, the first 48,894 merges joined, then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407). The result is the vocabulary of every Stable Diffusion tokenizer.

Usage: python scripts/make_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz [OUT_DIR]
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's SimpleTokenizer: merges[1 : 48895]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (same order as OpenAI's)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(m) for m in merges]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else (
        Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "clip_tokenizer")
    vocab, merges = derive(Path(sys.argv[1]))
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main()
