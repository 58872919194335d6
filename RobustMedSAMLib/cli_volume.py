"""The command line's volume commands: ``segment-volume``, ``robustness``, ``evaluate-volume`` and ``batch``,
with their shared arguments (volume, prompts, axis, intensities, propagation, encoding cache)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_model import _add_model_args, load_from_args


def _add_volume_args(p: argparse.ArgumentParser) -> None:
    """Volume, prompts, slicing, intensity, propagation, cache and model arguments of volume commands."""
    p.add_argument("volume", help="NIfTI, NRRD, MHA or a DICOM folder; sample:chest-ct for the sample CT")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="prompts JSON (format in the README)")
    src.add_argument("--markups", type=Path, nargs="+", help="3D Slicer markups .mrk.json (point lists, ROIs)")
    p.add_argument("--axis", default=None, help="slice axis: k (default), j, i, axial, coronal, sagittal")
    _add_propagation_args(p)
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"), help="limit propagation")
    p.add_argument("--window", help="CT window: wide (default for CT: -1000..1000 HU), soft_tissue, lung, bone, "
                                    "brain or LEVEL,WIDTH")
    p.add_argument("--modality", choices=["CT", "MR", "other"], help="override the guessed modality")
    p.add_argument("--square-pixels", action="store_true",
                   help="resample slices with non-square pixels (e.g. coronal views of thick-slice CT) to square "
                        "pixels for the model; results stay on the voxel grid")
    p.add_argument("--cache-mb", type=float, default=2048, help="in-memory encoding cache cap (MB)")
    p.add_argument("--fp16-cache", action="store_true", help="store cached encodings as float16")
    p.add_argument("--cache-dir", type=Path, help="also keep encodings on disk here (reused by later runs)")
    _add_model_args(p)


def _add_propagation_args(p: argparse.ArgumentParser) -> None:
    from .stop_rules import RULES

    p.add_argument("--stop-rule", choices=list(RULES), default=None,
                   help="consistency (default: the object must keep its grey levels and appearance) or micro-sam "
                        "(IoU of consecutive slices only)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="stop where consecutive slices overlap less (default: 0.4 consistency, 0.5 micro-sam)")
    p.add_argument("--projection", default=None, choices=["mask", "box", "points", "points_and_mask",
                                                          "single_point"],
                   help="prompts carried to the next slice (default: box for box-trained models such as "
                        "litemedsam and medsam, else mask = box + mask)")
    p.add_argument("--box-extension", type=float, default=None,
                   help="box growth per slice, fraction or pixels (default: 0.05 consistency, 0.025 micro-sam)")


def _propagation_options(args: argparse.Namespace) -> dict:
    return dict(iou_threshold=args.iou_threshold, projection=args.projection, box_extension=args.box_extension,
                stop_rule=args.stop_rule)


def _volume_inputs(args: argparse.Namespace):
    """The volume, its prompt objects and intensity mapping, read and checked before any model loads."""
    from .intensity import intensity_mapping
    from .prompt_files import read_prompts
    from .samples import resolve
    from .volume_io import read_volume

    volume = read_volume(resolve(args.volume))
    objects = read_prompts(args.prompts or args.markups, volume, args.axis)
    mapping = intensity_mapping(volume.array, modality=args.modality, window=args.window)
    print(f"{len(objects)} object(s); intensities: {mapping.description}", file=sys.stderr)
    return volume, objects, mapping


def _volume_predictor(args: argparse.Namespace):
    """The model's predictor with the requested cache, and the propagation options of the arguments."""
    from .predictor import EncodingCache, Predictor

    loaded, robust = load_from_args(args)
    cache = EncodingCache(max_bytes=int(args.cache_mb * 2**20), fp16=args.fp16_cache, disk_dir=args.cache_dir)
    options = dict(_propagation_options(args), slice_range=tuple(args.slice_range) if args.slice_range else None,
                   square_pixels=args.square_pixels)
    return Predictor(loaded, cache, robust=robust), options


def cmd_segment_volume(args: argparse.Namespace) -> int:
    from .progress import TextProgressBar
    from .segmentation_io import check_output_path
    from .volume_segmentation import segment_volume

    check_output_path(args.output)
    if args.report:
        check_output_path(args.report, kinds=(".json",))
    volume, objects, mapping = _volume_inputs(args)
    predictor, options = _volume_predictor(args)
    bar = TextProgressBar("segmenting", unit="slices")
    result = segment_volume(
        volume, objects, predictor, axis=args.axis or 0, images=mapping.apply(volume.array),
        propagate_volume=not args.no_propagation, progress=lambda done, total, _msg: bar(done, total), **options)
    bar.close()
    result.write(args.output, volume)
    if args.report:
        from .image_io import write_text

        write_text(args.report, json.dumps({"objects": result.report(), "encoded_slices": predictor.encoder_calls},
                                           indent=1))
    for obj in result.objects:
        print(f"{obj.name}: {int(obj.mask.sum())} voxels" + (
            f", slices {obj.propagation.z_range[0]}..{obj.propagation.z_range[1]}" if obj.propagation else ""))
    print(f"wrote {args.output} ({predictor.encoder_calls} slices encoded)")
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from .progress import TextProgressBar
    from .robustness import robustness_check, to_csv, to_markdown

    if args.csv:
        from .segmentation_io import check_output_path

        check_output_path(args.csv, kinds=(".csv",))
    volume, objects, mapping = _volume_inputs(args)
    reference = None
    if args.reference:
        from .robustness import reference_masks
        from .segmentation_io import read_segmentation

        # {object name: mask}: every object has its segment, checked before the model loads
        reference = reference_masks(read_segmentation(args.reference, reference=volume), objects)
    predictor, options = _volume_predictor(args)
    bar = TextProgressBar("robustness", unit="runs")
    rows = robustness_check(volume, objects, predictor, corruption_names=args.corruptions, severity=args.severity,
                            seed=args.seed, axis=args.axis or 0, images=mapping.apply(volume.array),
                            reference=reference, progress=lambda done, total, _msg: bar(done, total), **options)
    bar.close()
    if args.csv:
        from .image_io import write_text

        write_text(args.csv, to_csv(rows))
    print(to_markdown(rows), end="")
    return 0


def cmd_evaluate_volume(args: argparse.Namespace) -> int:
    from .field_evaluation import field_evaluation, to_csv, to_markdown, write_png
    from .predictor import EncodingCache, Predictor
    from .progress import TextProgressBar
    from .samples import PREFIX, resolve
    from .segmentation_io import read_segmentation
    from .volume_io import read_volume

    reference_path = args.reference
    if reference_path is None:
        if str(args.volume) != f"{PREFIX}chest-ct":
            raise ValueError("give the reference segmentation: --reference SEG (.seg.nrrd or a label volume)")
        reference_path = f"{PREFIX}chest-ct-segmentation"
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    volume = read_volume(resolve(args.volume))
    reference = read_segmentation(resolve(reference_path), reference=volume)
    windows = dict(args.segment_window or [])
    loaded, robust = load_from_args(args)
    cache = EncodingCache(max_bytes=int(args.cache_mb * 2**20), disk_dir=args.cache_dir)
    predictor = Predictor(loaded, cache, robust=robust)
    bar = TextProgressBar("evaluating", unit="segments")
    evaluation = field_evaluation(volume, reference, predictor, segments=args.segments, axis=args.axis or 0,
                                  modality=args.modality, window=args.window, windows=windows,
                                  square_pixels=args.square_pixels,
                                  progress=lambda done, total, _name: bar(done, total), **_propagation_options(args))
    bar.close()
    table = to_markdown(evaluation)
    print(table, end="")
    if args.output_dir is not None:
        from .image_io import write_text
        from .intensity import intensity_mapping

        write_text(args.output_dir / "field_evaluation.md", table)
        write_text(args.output_dir / "field_evaluation.csv", to_csv(evaluation))
        images = intensity_mapping(volume.array, modality=args.modality, window=args.window).apply(volume.array)
        write_png(args.output_dir / "field_evaluation.png", volume, evaluation, images=images)
        print(f"wrote field_evaluation.md, .csv and .png in {args.output_dir} ({predictor.encoder_calls} slices "
              "encoded)")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import os

    from . import batch
    from .predictor import EncodingCache, Predictor

    if args.manifest:
        cases = batch.cases_from_manifest(args.manifest)
    elif args.volumes and args.prompts and args.output_dir:
        cases = batch.cases_from_folders(args.volumes, args.prompts, args.output_dir, args.suffix)
    else:
        raise ValueError("give --manifest CSV, or --volumes DIR --prompts DIR --output-dir DIR")
    rank, world = batch.shard_from_env(args.shard)
    mine = batch.my_cases(cases, rank, world)
    done = sum(c.output.exists() for c in mine) if not args.overwrite else 0
    print(f"shard {rank}/{world}: {len(mine)} of {len(cases)} cases, {done} already done", file=sys.stderr)
    if args.device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # one GPU per torchrun process
            args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    defaults = {"axis": args.axis, "window": args.window, "modality": args.modality,
                "report": args.report, **_propagation_options(args)}
    predictors = []  # the model is loaded on the first case that needs it (none if all are done)

    def process(case):
        if not predictors:
            loaded, robust = load_from_args(args, quiet=rank != 0)
            predictors.append(Predictor(loaded, EncodingCache(max_bytes=int(args.cache_mb * 2**20)), robust=robust))
        return batch.segment_case(case, predictors[0], defaults)

    log_path = Path(args.case_log) if args.case_log else None
    if log_path is not None and world > 1:
        log_path = log_path.with_name(f"{log_path.stem}.rank{rank}{log_path.suffix}")
    outcomes = batch.run_cases(mine, process, overwrite=args.overwrite, log_path=log_path)
    failed = sum(o.status == "failed" for o in outcomes)
    print(f"shard {rank}/{world}: {sum(o.status == 'done' for o in outcomes)} done, "
          f"{sum(o.status == 'skipped' for o in outcomes)} skipped, {failed} failed", file=sys.stderr)
    # torchrun stops every process as soon as one exits non-zero: agree on the outcome first
    failed = batch.total_over_processes(failed, rank, world)
    return 1 if failed else 0
