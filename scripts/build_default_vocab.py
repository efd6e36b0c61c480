"""Regenerate quantsd/assets/tokenizer/ (the default offline CLIP vocabulary).

Merges are learned from the 1,500 most frequent words of the MS-COCO 2014 val captions in
../shared/assets (so caption words are mostly single tokens); every other text still
tokenizes through CLIP's 512 byte-level base tokens.

    .venv/bin/python scripts/build_default_vocab.py
"""

import collections
import csv
import re
from pathlib import Path

from quantsd.tokenizer import DEFAULT_VOCAB_DIR, write_clip_vocab

CAPTIONS = Path(__file__).resolve().parents[2] / "shared/assets/coco2014_val_captions_5k/captions_source.tsv"

if __name__ == "__main__":
    with open(CAPTIONS, newline="", encoding="utf-8") as f:
        captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t")]
    counts = collections.Counter(w for c in captions for w in re.findall("[a-z]+", c.lower()))
    words = [w for w, _ in counts.most_common(1500)]
    write_clip_vocab(words, DEFAULT_VOCAB_DIR, max_merges=3000)
    print(f"wrote {DEFAULT_VOCAB_DIR}")
