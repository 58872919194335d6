"""Dice of one or more models per dataset x corruption (clean + 12) x prompt (box, points).

Usage::

    robustmedsam evaluate --model sam-vit-b --model medsam --model robustsam \\
        --checkpoint RobustMedSAM=runs/a/model.safetensors --npz kvasir --npz busi --output eval/
    python Training/evaluate.py ...   (the same)

For every image with a non-empty label (``--max-images`` per dataset), the target is its largest object
(as in training); the prompts are its tight box (optionally enlarged by up to ``--box-shift`` px) and
``--num-points`` positive points drawn from it, seeded per image so every model and corruption sees the same
prompts. Each corruption is applied to the image at its own resolution with a seed per (image, corruption);
inference goes through :class:`RobustMedSAMLib.predictor.Predictor` (each degraded image is encoded once per
model, both prompts reuse the encoding). Dice = 2|P & G| / (|P| + |G|) (1 when both are empty).

Outputs in ``--output``: ``dice_per_image.csv`` (one row per image x corruption x prompt x model),
``dice.csv`` (mean Dice, one column per model), ``dice.md`` (Markdown tables: per prompt, corruption rows
averaged over datasets, and a per-dataset summary) and ``dice.png`` (grouped bars; skipped with a message
when matplotlib is missing). Model columns are ordered SAM, MedSAM, RobustSAM, RobustMedSAM, then the others.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Training import datasets as D  # noqa: E402
from Training.cli_common import (add_source_args, ensure_output_folder, progress_bar,  # noqa: E402
                                 require_objects, sources_from)
from RobustMedSAMLib.robustness import dice as dice_score  # noqa: E402  (the engine's Dice, 1.0 when both are empty)

log = logging.getLogger("robustmedsam.evaluate")

PROMPT_KINDS = ("box", "points")
OUTPUT_FILES = ("dice_per_image.csv", "dice.csv", "dice.md", "dice.png")
CANONICAL = (("sam-vit-b", "SAM"), ("medsam", "MedSAM"), ("robustsam", "RobustSAM"), ("robustmedsam", "RobustMedSAM"),
             ("litemedsam", "LiteMedSAM"))


class EvaluationError(ValueError):
    """Bad evaluation options or inputs."""


@dataclass
class EvalModel:
    label: str
    loaded: object  # LoadedModel
    robust: bool


def order_models(labels: Sequence[str]) -> List[str]:
    """Canonical columns first (SAM, MedSAM, RobustSAM, RobustMedSAM), then the others as given."""
    rank = {}
    for n, (name, label) in enumerate(CANONICAL):
        rank[name.lower()] = rank[label.lower()] = n
    known = sorted((l for l in labels if l.lower() in rank), key=lambda l: rank[l.lower()])
    return known + [l for l in labels if l.lower() not in rank]


def eval_prompts(target: np.ndarray, index: int, seed: int, num_points: int, box_shift: int):
    """``{"box": Prompt, "points": Prompt}`` for one image (seeded by image index)."""
    from RobustMedSAMLib.prompts import Prompt

    rng = np.random.default_rng([int(seed), int(index), 1])
    points = D.sample_points(target, num_points, rng)
    box = D.jittered_box(target, box_shift, rng)
    return {"box": Prompt(box=box), "points": Prompt(points=points, labels=np.ones(len(points), dtype=np.int64))}


def evaluate(models: Sequence[EvalModel], sources: Sequence[D.Source], corruptions: Sequence[str],
             prompts: Sequence[str] = PROMPT_KINDS, severity: int = 3, max_images: int = 0, seed: int = 0,
             num_points: int = 3, box_shift: int = 0, label_mode: str = "semantic",
             progress: bool = False) -> List[dict]:
    """One row per image x corruption x prompt x model: dataset, image, corruption, prompt, model, dice."""
    from RobustMedSAMLib.predictor import EncodingCache, Predictor
    from RobustMedSAMLib.preprocess import as_rgb

    predictors = [(m.label, Predictor(m.loaded, cache=EncodingCache(max_bytes=64 << 20), robust=m.robust))
                  for m in models]
    work = []
    for source in sources:
        items = source.candidates()
        if max_images:
            items = items[:max_images]
        work.extend((source, i) for i in items)
    if not work:
        raise EvaluationError("no image with a non-empty mask to evaluate on")
    bar = progress_bar(len(work) * len(corruptions), "image", enabled=progress)
    rows = []
    for source, index in work:
        item = source.item(index)
        target = D.largest_object(item.label, label_mode)
        rgb = as_rgb(item.image)
        kinds = eval_prompts(target, index, seed, num_points, box_shift)
        for c_index, corruption in enumerate(corruptions):
            cseed = int(np.random.default_rng([int(seed), int(index), 2, c_index]).integers(2 ** 31 - 1))
            image = D.degrade(rgb, corruption, severity, cseed)
            for label, predictor in predictors:
                preds = predictor.predict_batch([kinds[k] for k in prompts], image=image)
                for kind, pred in zip(prompts, preds):
                    rows.append({"dataset": source.name, "image": item.name, "corruption": corruption,
                                 "prompt": kind, "model": label, "dice": dice_score(pred.mask, target)})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for _, predictor in predictors:
        predictor.close()
    return rows


def summarise(rows: Sequence[dict]) -> Dict[Tuple[str, str, str, str], float]:
    """Mean Dice per (dataset, prompt, corruption, model)."""
    sums: Dict[tuple, List[float]] = {}
    for r in rows:
        sums.setdefault((r["dataset"], r["prompt"], r["corruption"], r["model"]), []).append(r["dice"])
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _unique(values) -> List[str]:
    return list(dict.fromkeys(values))


def write_tables(rows: Sequence[dict], out: Path, models: Sequence[str]) -> Dict[str, Path]:
    """``dice_per_image.csv``, ``dice.csv`` (wide) and ``dice.md``; returns their paths."""
    means = summarise(rows)
    datasets = _unique(r["dataset"] for r in rows)
    prompts = _unique(r["prompt"] for r in rows)
    corruptions = _unique(r["corruption"] for r in rows)
    paths = {"per_image": out / "dice_per_image.csv", "csv": out / "dice.csv", "markdown": out / "dice.md"}
    with open(paths["per_image"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dataset", "image", "corruption", "prompt", "model", "dice"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, dice=f"{r['dice']:.6f}"))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "prompt", "corruption"] + list(models))
        for d in datasets:
            for p in prompts:
                for c in corruptions:
                    w.writerow([d, p, c] + [f"{means[(d, p, c, m)]:.6f}" for m in models])

    def over_datasets(p, c, m):
        return float(np.mean([means[(d, p, c, m)] for d in datasets]))

    degraded = [c for c in corruptions if c != "clear"]
    lines = ["# Dice by corruption", "",
             f"Mean Dice over {len(datasets)} dataset(s) ({', '.join(datasets)}); "
             f"{len({(r['dataset'], r['image']) for r in rows})} image(s).", ""]
    for p in prompts:
        lines += [f"## {p} prompt", "", "| corruption | " + " | ".join(models) + " |",
                  "|---|" + "---:|" * len(models)]
        for c in corruptions:
            lines.append(f"| {c} | " + " | ".join(f"{over_datasets(p, c, m):.3f}" for m in models) + " |")
        if degraded:
            lines.append("| **mean degraded** | " + " | ".join(
                f"**{np.mean([over_datasets(p, c, m) for c in degraded]):.3f}**" for m in models) + " |")
        lines.append("")
    lines += ["## Per dataset (clean / mean degraded)", "",
              "| dataset | prompt | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for d in datasets:
        for p in prompts:
            cells = []
            for m in models:
                clean = f"{means[(d, p, 'clear', m)]:.3f}" if "clear" in corruptions else "-"
                deg = f"{np.mean([means[(d, p, c, m)] for c in degraded]):.3f}" if degraded else "-"
                cells.append(f"{clean} / {deg}")
            lines.append(f"| {d} | {p} | " + " | ".join(cells) + " |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


def write_plot(rows: Sequence[dict], path: Path, models: Sequence[str]) -> Optional[Path]:
    """Grouped bars of mean Dice per corruption (one panel per prompt); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib); the tables were written")
        return None
    means = summarise(rows)
    datasets = _unique(r["dataset"] for r in rows)
    prompts = _unique(r["prompt"] for r in rows)
    corruptions = _unique(r["corruption"] for r in rows)
    fig, axes = plt.subplots(len(prompts), 1, figsize=(max(6.0, 0.75 * len(corruptions) * max(1, len(models)) / 2 + 3),
                                                         3.2 * len(prompts)), squeeze=False)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(corruptions))
    for ax, p in zip(axes[:, 0], prompts):
        for n, m in enumerate(models):
            values = [np.mean([means[(d, p, c, m)] for d in datasets]) for c in corruptions]
            ax.bar(x + (n - (len(models) - 1) / 2) * width, values, width, label=m)
        ax.set_xticks(x)
        ax.set_xticklabels(corruptions, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title(f"{p} prompt: mean Dice over {len(datasets)} dataset(s)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(4, len(models)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ================================================================================================ CLI
def build_parser(prog: str = "robustmedsam evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models (repeat; columns side by side)")
    g.add_argument("--model", action="append", default=[],
                   help="named model (sam-vit-b, medsam, robustsam, robustmedsam, litemedsam)")
    g.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]FILE",
                   help="checkpoint file; adapters named in its metadata are loaded from its folder")
    g.add_argument("--seeded-tiny", action="store_true", help="add the tiny seeded test model")
    g.add_argument("--device", default="auto")
    g.add_argument("--batchnorm", choices=["running", "per_sample"], default="running")
    g.add_argument("--sam-path", action="store_true", help="use the SAM decoder path of robust checkpoints")
    g.add_argument("--offline", action="store_true", help="never download weights")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 (default here: numbers comparable with published ones), auto (bf16 where this CPU "
                        "computes it natively and the model's bf16 gate holds) or bf16")
    g = p.add_argument_group("data")
    add_source_args(g, split="test")
    g.add_argument("--label-mode", default="semantic", choices=D.LABEL_MODES)
    g.add_argument("--max-images", type=int, default=0, help="per dataset (0: all)")
    g = p.add_argument_group("protocol")
    g.add_argument("--prompts", nargs="+", default=list(PROMPT_KINDS), choices=PROMPT_KINDS)
    g.add_argument("--corruptions", nargs="+", help="default: clear + the 12 corruptions")
    g.add_argument("--severity", type=int, default=3)
    g.add_argument("--num-points", type=int, default=3)
    g.add_argument("--box-shift", type=int, default=0, help="random box enlargement per side (px)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _check_output(out: Path, overwrite: bool) -> None:
    ensure_output_folder(out, EvaluationError)
    existing = [n for n in OUTPUT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")


def load_models(args) -> List[EvalModel]:
    from RobustMedSAMLib.models import load_model, seeded_model

    specs = []
    for name in args.model:
        specs.append((dict(CANONICAL).get(name.lower(), name), name, None))
    for text in args.checkpoint:
        label, path = None, text
        if "=" in text and not Path(text).exists():
            label, path = text.split("=", 1)
        specs.append((label or Path(path).stem, None, path))
    if not specs and not args.seeded_tiny:
        raise EvaluationError("give at least one model: --model NAME, --checkpoint FILE or --seeded-tiny")
    models = []
    if args.seeded_tiny:
        loaded = seeded_model("tiny", seed=0, device=args.device, precision=args.precision)
        models.append(EvalModel("tiny (seeded)", loaded, loaded.config.robust and not args.sam_path))
    for label, name, path in specs:
        loaded = load_model(name, path, device=args.device, batchnorm=args.batchnorm,
                            allow_download=not args.offline, precision=args.precision)
        adapters = loaded.metadata.get("adapters")
        if adapters and path and (Path(path).parent / adapters).is_file():
            from Training.adapters import load_adapters

            load_adapters(loaded.model, Path(path).parent / adapters)
            log.info("%s: loaded adapters %s", label, adapters)
        models.append(EvalModel(label, loaded, loaded.config.robust and not args.sam_path))
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise EvaluationError(f"two models share a column label ({labels}); name checkpoints as LABEL=FILE")
    return models


def run(args) -> Dict[str, Path]:
    out = Path(args.output)
    _check_output(out, args.overwrite)
    corruptions = D.corruption_choices(args.corruptions)
    sources = sources_from(args, npz=args.npz, images=args.images, masks=args.masks, split=args.split)
    require_objects(sources)
    models = load_models(args)
    rows = evaluate(models, sources, corruptions, args.prompts, args.severity, args.max_images, args.seed,
                    args.num_points, args.box_shift, args.label_mode, progress=args.progress)
    columns = order_models([m.label for m in models])
    paths = write_tables(rows, out, columns)
    if not args.no_plot:
        plot = write_plot(rows, out / "dice.png", columns)
        if plot is not None:
            paths["plot"] = plot
    return paths


def main(argv: Optional[Sequence[str]] = None, prog: str = "robustmedsam evaluate") -> int:
    from RobustMedSAMLib.checkpoints import CheckpointError
    from RobustMedSAMLib.models import ModelNotFoundError
    from RobustMedSAMLib.weights import WeightsError

    args = build_parser(prog).parse_args(argv)
    try:
        paths = run(args)
    except (EvaluationError, D.DatasetError, CheckpointError, ModelNotFoundError, WeightsError,
            FileExistsError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="evaluate.py"))
