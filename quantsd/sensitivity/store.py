"""Lossless, resumable result storage: an append-only JSONL file plus atomic rewrites."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable



class SweepDirError(ValueError):
    """The output directory holds a sweep that does not match this one."""


class ResultStore:
    """``sensitivity.jsonl``: one JSON object per finished configuration.

    Each record is appended and fsync'ed as soon as it exists, so an interrupt loses at most
    the configuration in flight. A torn last line (killed mid-write) is cut off on open.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end < len(raw):  # torn final write: drop it, keep everything before it
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        for line in raw[:good_end].decode("utf-8").splitlines():
            if line.strip():
                self.records.append(json.loads(line))

    def done_keys(self) -> set[tuple]:
        return {self.key(r) for r in self.records}

    @staticmethod
    def key(record: dict) -> tuple:
        return (record["block"], record["method"], int(record["bits"]), record["granularity"])

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def extend(self, records: Iterable[dict]) -> None:
        for r in records:
            self.append(r)
