"""Offline CLIP-format tokenizers.

No hub access is possible on many machines (and in CI), yet every diffusers Stable Diffusion
pipeline needs a ``CLIPTokenizer``.  quantsd therefore builds CLIP-format vocabularies itself:
the 512 byte-level base tokens of CLIP's BPE (every byte, with and without the end-of-word
marker ``</w>``) so that *any* text tokenizes, plus merges learned from a small word list so
that the words a model actually sees become single tokens.  The files are the standard
``vocab.json`` / ``merges.txt`` pair, so ``CLIPTokenizer.from_pretrained(dir)`` reads them.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer

_END = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable-unicode map (the standard construction)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def learn_merges(words: Iterable[str], max_merges: int = 4096) -> list[tuple[str, str]]:
    """Learn BPE merges (most frequent pair first) until every word is one token.

    Words are lower-cased and split like CLIP's pre-tokenizer; each distinct word counts once,
    so a short word list yields a short, deterministic merge table.
    """
    byte_map = _bytes_to_unicode()
    vocab: dict[tuple[str, ...], int] = collections.Counter()
    for text in words:
        for word in _WORD_RE.findall(text.lower()):
            chars = [byte_map[b] for b in word.encode("utf-8")]
            vocab[tuple(chars[:-1]) + (chars[-1] + _END,)] = 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        # Highest count, ties broken lexicographically -> deterministic across runs.
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for symbols, freq in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] = freq
        vocab = new_vocab
    return merges


def write_clip_vocab(words: Iterable[str], out_dir: str | Path, max_merges: int = 4096) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` in CLIP's format for the given word list."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    merges = learn_merges(words, max_merges=max_merges)
    tokens = base + [b + _END for b in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def load_clip_tokenizer(vocab_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Build a ``CLIPTokenizer`` from a vocab.json/merges.txt pair, fully offline."""
    # from_pretrained on a local folder never touches the network and works across
    # transformers 4.x (slow/fast) and 5.x (tokenizers backend) constructor signatures.
    return CLIPTokenizer.from_pretrained(
        str(vocab_dir), model_max_length=model_max_length, pad_token="<|endoftext|>",
        local_files_only=True,
    )


DEFAULT_VOCAB_DIR = Path(__file__).parent / "assets" / "tokenizer"


def default_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The tokenizer shipped with quantsd (byte-level base + merges for common caption words)."""
    return load_clip_tokenizer(DEFAULT_VOCAB_DIR, model_max_length=model_max_length)
