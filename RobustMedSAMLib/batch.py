"""Batch runs over many cases: a folder or a CSV manifest, sharded across processes, GPUs and machines.

Each case is ``volume + prompts -> output`` through :func:`~RobustMedSAMLib.volume_segmentation.segment_volume`.
Sharding: process ``rank`` of ``world`` takes cases ``rank, rank + world, ...`` (from ``torchrun``'s ``RANK`` /
``WORLD_SIZE``, or ``--shard R/N`` per machine). A case whose output exists is skipped, outputs are written
atomically, so a stopped run that is started again loses nothing and repeats nothing. A failing case is
reported and the run goes on; the exit code says whether every case succeeded.

Manifest CSV columns: ``volume``, ``prompts``, ``output`` (relative paths are relative to the CSV's folder),
optional ``axis``, ``window``, ``modality``. Folder mode pairs ``VOLUME_DIR/<case>.<ext>`` with
``PROMPTS_DIR/<case>.json`` (or ``.mrk.json``) and writes ``OUTPUT_DIR/<case><suffix>``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .volume_io import VOLUME_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One unit of work. ``options`` may hold ``axis``, ``window``, ``modality``."""

    name: str
    volume: Path
    prompts: Path
    output: Path
    options: Dict[str, str] = field(default_factory=dict)


def _case_name(path: Path) -> str:
    name = path.name
    for ext in sorted(VOLUME_EXTENSIONS + (".mrk.json", ".json"), key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def cases_from_manifest(path: os.PathLike) -> List[Case]:
    """Cases from a CSV with columns volume, prompts, output [, axis, window, modality]."""
    path = Path(path)
    base = path.parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"volume", "prompts", "output"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected volume, prompts, "
                             "output [, axis, window, modality]")
        cases = []
        for n, row in enumerate(reader, start=2):
            if not (row.get("volume") or "").strip():
                continue
            p = {k: base / row[k].strip() for k in ("volume", "prompts", "output")}
            opts = {k: row[k].strip() for k in ("axis", "window", "modality") if (row.get(k) or "").strip()}
            cases.append(Case(_case_name(p["volume"]), p["volume"], p["prompts"], p["output"], opts))
    names = [c.output for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: several rows write the same output file")
    return cases


def cases_from_folders(volumes: os.PathLike, prompts: os.PathLike, outputs: os.PathLike,
                       suffix: str = ".seg.nrrd") -> List[Case]:
    """Pair every volume (file or DICOM sub-folder) with ``<case>.json`` / ``<case>.mrk.json`` prompts."""
    volumes, prompts, outputs = Path(volumes), Path(prompts), Path(outputs)
    cases, unmatched = [], []
    for item in sorted(volumes.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_file() and not item.name.lower().endswith(VOLUME_EXTENSIONS):
            continue
        name = _case_name(item) if item.is_file() else item.name
        match = next((prompts / f"{name}{ext}" for ext in (".json", ".mrk.json") if (prompts / f"{name}{ext}").exists()),
                     None)
        if match is None:
            unmatched.append(name)
            continue
        cases.append(Case(name, item, match, outputs / f"{name}{suffix}"))
    if unmatched:
        log.warning("no prompts for %d volume(s): %s", len(unmatched), ", ".join(unmatched[:10]))
    if not cases:
        raise ValueError(f"no case found: no volume in {volumes} has a prompts file <case>.json in {prompts}")
    return cases


def shard_from_env(shard: Optional[str] = None) -> Tuple[int, int]:
    """``(rank, world)`` from ``--shard R/N``, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if shard:
        try:
            rank, world = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like R/N (e.g. 0/4), got {shard!r}") from None
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: the rank must be in 0..{world - 1}")
    return rank, world


def my_cases(cases: Sequence[Case], rank: int, world: int) -> List[Case]:
    """The cases of process ``rank`` among ``world`` (round robin, stable for a given case list)."""
    return list(cases[rank::world])


def total_over_processes(count: int, rank: int, world: int) -> int:
    """Sum ``count`` over the processes of a torchrun job (waits for all of them); ``count`` when alone.

    torchrun terminates every process as soon as one exits with an error, so the processes of a batch run
    first wait for each other here and then all exit with the same code.
    """
    if world == 1 or "MASTER_ADDR" not in os.environ:
        return count
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=7))
    try:
        total = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())
    finally:
        dist.destroy_process_group()


@dataclass
class CaseOutcome:
    name: str
    status: str  # "done", "skipped", "failed"
    seconds: float = 0.0
    message: str = ""


def run_cases(cases: Sequence[Case], process: Callable[[Case], str], *, overwrite: bool = False,
              log_path: Optional[Path] = None) -> List[CaseOutcome]:
    """Run ``process(case) -> message`` for each case; skip existing outputs; never stop on a failure.

    ``log_path``: a CSV (``case,status,seconds,message``) appended after every case.
    """
    outcomes = []
    for case in cases:
        start = time.monotonic()
        if case.output.exists() and not overwrite:
            outcome = CaseOutcome(case.name, "skipped", 0.0, f"{case.output} exists")
        else:
            try:
                case.output.parent.mkdir(parents=True, exist_ok=True)
                outcome = CaseOutcome(case.name, "done", 0.0, process(case))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
                log.error("%s failed: %s", case.name, e)
                outcome = CaseOutcome(case.name, "failed", 0.0, f"{type(e).__name__}: {e}")
        outcome.seconds = round(time.monotonic() - start, 2)
        outcomes.append(outcome)
        print(f"[{outcome.status}] {case.name} ({outcome.seconds:.1f} s) {outcome.message}", flush=True)
        if log_path is not None:
            new = not log_path.exists()
            with open(log_path, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["case", "status", "seconds", "message"])
                w.writerow([outcome.name, outcome.status, outcome.seconds, outcome.message])
    return outcomes


def segment_case(case: Case, predictor, defaults: Dict[str, object]) -> str:
    """Segment one case with the shared predictor (its encoding cache is reused across cases)."""
    from .intensity import intensity_mapping
    from .prompt_files import read_prompts
    from .samples import resolve
    from .volume_io import read_volume
    from .volume_segmentation import segment_volume

    opts = {**defaults, **case.options}
    volume = read_volume(resolve(case.volume))
    axis = opts.get("axis") or 0
    objects = read_prompts(case.prompts, volume, axis)
    mapping = intensity_mapping(volume.array, modality=opts.get("modality"), window=opts.get("window"))
    result = segment_volume(volume, objects, predictor, axis=axis, images=mapping.apply(volume.array),
                            **{k: (float(opts[k]) if k in ("iou_threshold", "box_extension") else opts[k])
                               for k in ("iou_threshold", "projection", "box_extension", "stop_rule")
                               if opts.get(k) is not None})
    result.write(case.output, volume)
    if opts.get("report"):
        report = case.output.with_name(case.output.name.split(".")[0] + ".report.json")
        report.write_text(json.dumps(result.report(), indent=1))
    return ", ".join(f"{o.name}: {int(o.mask.sum())} voxels" for o in result.objects)
