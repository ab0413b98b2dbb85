"""Per-image results on disk: one JSON line per (image, explainer, explained class).

Layout of an output folder::

    OUT/evaluation.json        the configuration and its hash (written first)
    OUT/records.rank<R>.jsonl  the lines process R wrote in this run (appended, flushed and fsynced
                               after every batch)
    OUT/records.jsonl          all lines, sorted by dataset index (written at the end; the rank files
                               are then removed)

A line (see ``docs/evaluation.md``)::

    {"config": "<hash>", "index": 12, "id": "ILSVRC2012_val_00000013", "entry": "grad-cam",
     "row": 0, "rows": 1, "target": 65, "values": {"insertion": 0.61, ...},
     "statistics": {"saliency-segmentation": [..7 numbers..]}, "seconds": {"explain": 0.01,
     "metrics": {"insertion": 0.2}}}

An image is *finished* when every entry has all its ``rows`` lines. A run that was killed leaves
at most a partly written batch: on the next start its lines are ignored (and removed from the
process's own file) and the image is evaluated again. Files of a run with another configuration
are refused (one-line error) unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

from ..core.errors import InputError

CONFIG_FILE = "evaluation.json"
MERGED_FILE = "records.jsonl"
RESULT_FILES = ("results.json", "results.md", "results.png", "maps.png", "report.html")


def config_hash(config: dict) -> str:
    """16 hex digits of the SHA-256 of the configuration as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def json_number(v: float) -> float | None:
    """A float for JSON: NaN and infinities become null (read back as NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`foveal.core.checkpoint.atomic_write_bytes`)."""
    from ..core.checkpoint import atomic_write_bytes

    return atomic_write_bytes(text.encode("utf-8"), path)


def read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file (a line cut by a kill, the last one, is skipped)."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut short by a kill
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def complete_records(records: Iterable[dict], entries: list[str]) -> dict[int, list[dict]]:
    """Records of the finished images only, by dataset index (duplicates dropped, lines sorted by
    entry then row)."""
    by_index: dict[int, dict[tuple[str, int], dict]] = {}
    for r in records:
        by_index.setdefault(int(r["index"]), {}).setdefault((r["entry"], int(r["row"])), r)
    order = {e: k for k, e in enumerate(entries)}
    done: dict[int, list[dict]] = {}
    for index, lines in by_index.items():
        counts: dict[str, int] = {}
        expected: dict[str, int] = {}
        for (entry, _), r in lines.items():
            counts[entry] = counts.get(entry, 0) + 1
            expected[entry] = int(r["rows"])
        if all(e in counts and counts[e] == expected[e] for e in entries):
            done[index] = sorted((r for r in lines.values() if r["entry"] in order),
                                 key=lambda r: (order[r["entry"]], int(r["row"])))
    return done


class RecordStore:
    """The records of one evaluation run in ``folder`` (see the module docstring); ``rank`` and
    ``world`` of a torchrun job (each process appends to its own file, rank 0 merges)."""

    def __init__(self, folder: str | os.PathLike, config: dict, entries: list[str], *, rank: int = 0,
                 world: int = 1, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.config = config
        self.hash = config_hash(config)
        self.entries = entries
        self.rank, self.world, self.overwrite = rank, world, overwrite
        self.own = self.folder / f"records.rank{rank}.jsonl"

    # --- start ----------------------------------------------------------------------------
    def start(self) -> set[int]:
        """Check (or, with ``overwrite``, clear) the folder, then return the finished dataset
        indices. Every process checks; rank 0 writes; all wait for each other."""
        saved = self.folder / CONFIG_FILE
        if saved.exists() and not self.overwrite:
            old = json.loads(saved.read_text())
            if old.get("config_hash") != self.hash:
                differ = sorted(k for k in set(old.get("config", {})) | set(self.config)
                                if old.get("config", {}).get(k) != self.config.get(k))
                raise InputError(
                    f"{self.folder} holds results of another configuration (hash {old.get('config_hash')}, this "
                    f"run {self.hash}; differs in: {', '.join(differ) or 'unknown'}): pass --overwrite "
                    "(overwrite=True) to start over, or choose another output folder")
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                for p in self._record_files() + [self.folder / n for n in RESULT_FILES]:
                    p.unlink(missing_ok=True)
            write_text_atomic(saved, json.dumps({"config_hash": self.hash, "config": self.config}, indent=2,
                                                default=str) + "\n")
        self._barrier()
        done = self._read_done()
        own = read_lines(self.own)
        mine = [r for r in own if int(r["index"]) in done]
        if self.own.exists() and (len(mine) != len(own) or not self._ends_cleanly(self.own)):
            write_text_atomic(self.own, "".join(json.dumps(r) + "\n" for r in mine))  # drop unfinished images
        self._barrier()
        return set(done)

    @staticmethod
    def _ends_cleanly(path: Path) -> bool:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _record_files(self) -> list[Path]:
        return sorted(self.folder.glob("records.rank*.jsonl")) + [self.folder / MERGED_FILE]

    def _read_done(self) -> dict[int, list[dict]]:
        records = [r for p in self._record_files() for r in read_lines(p)]
        foreign = {r.get("config") for r in records} - {self.hash}
        if foreign:
            raise InputError(f"{self.folder} holds records of another configuration (hash {sorted(foreign)[0]}, this "
                             f"run {self.hash}): pass --overwrite (overwrite=True) or choose another output folder")
        return complete_records(records, self.entries)

    # --- during the run -------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        """Append one batch of lines, flushed and fsynced before returning."""
        text = "".join(json.dumps({"config": self.hash, **r}) + "\n" for r in records)
        with open(self.own, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    # --- end ------------------------------------------------------------------------------
    def finish(self, n: int) -> dict[int, list[dict]]:
        """Wait for every process; rank 0 writes ``records.jsonl`` (every finished image, sorted by
        index) and removes the rank files. Returns the records of images ``0..n-1`` by index."""
        self._barrier()
        if self.rank == 0:
            done = self._read_done()
            lines = [r for index in sorted(done) for r in done[index]]
            write_text_atomic(self.folder / MERGED_FILE, "".join(json.dumps(r) + "\n" for r in lines))
            for p in self.folder.glob("records.rank*.jsonl"):
                p.unlink()
        self._barrier()
        done = complete_records(read_lines(self.folder / MERGED_FILE), self.entries)
        missing = [i for i in range(n) if i not in done]
        if missing:
            raise RuntimeError(f"evaluation finished without results for {len(missing)} image(s) "
                               f"(dataset indices {missing[:5]}...): rerun to complete them")
        return {i: done[i] for i in range(n)}

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class MemoryStore:
    """The same interface without files (``evaluate(..., out=None)``)."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries
        self.records: list[dict] = []
        self.hash = None

    def start(self) -> set[int]:
        return set()

    def append(self, records: list[dict]) -> None:
        self.records += records

    def finish(self, n: int) -> dict[int, list[dict]]:
        done = complete_records(self.records, self.entries)
        return {i: done[i] for i in range(n)}


def read_results(folder: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(evaluation.json content, records)`` of a finished output folder."""
    folder = Path(folder)
    saved = folder / CONFIG_FILE
    if not saved.exists():
        raise FileNotFoundError(f"{saved} not found: not an evaluation output folder")
    return json.loads(saved.read_text()), read_lines(folder / MERGED_FILE)

