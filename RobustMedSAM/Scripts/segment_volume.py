"""Batch segmentation with the RobustMedSAM extension, without the Slicer GUI.

    Slicer --no-main-window --python-script RobustMedSAM/Scripts/segment_volume.py \\
        --input ct.nrrd --prompts prompts.json --output ct.seg.nrrd [--model robustmedsam | --checkpoint FILE]

The volume is loaded into the MRML scene with Slicer's volume storage node (a DICOM folder is read with the
engine's SimpleITK reader and put into a volume node with the same geometry), the prompts (RobustMedSAM
prompt JSON or Slicer ``.mrk.json`` files) are converted on the volume's voxel slices, the module's logic
segments and propagates each object into a segment, and the segmentation is saved with Slicer's
segmentation storage node (``.seg.nrrd``). Failures print one line saying what is wrong and exit non-zero.

Slicer reads ``-h``/``--help`` itself (it prints its own options and exits): ``--usage`` prints this script's
options, or put ``--`` (Slicer's "ignore the rest") before the script's arguments, after which Slicer passes
everything on unread: ``Slicer --no-main-window --python-script segment_volume.py -- --help``.

Also runs with plain Python where the ``slicer-core`` wheel is installed (a headless scene is set up; there
``-h``/``--help`` work as usual). ``main(argv)`` is importable for tests.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_WEIGHTS = 0, 1, 2, 3


def _ensure_import_path() -> None:
    """Make ``RobustMedSAMLogic`` and ``RobustMedSAMLib`` importable when run from a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, here.parent.parent):
        if (candidate / "RobustMedSAMLogic").is_dir() or (candidate / "RobustMedSAMLib").is_dir():
            if str(candidate) not in sys.path:
                sys.path.insert(0, str(candidate))


USAGE_HINT = ("Slicer reads -h/--help itself: use --usage for this script's options, or put -- before the "
              "script's arguments (Slicer --no-main-window --python-script segment_volume.py -- --help)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors also say how to get the full help inside Slicer
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n{self.prog}: {USAGE_HINT}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="segment_volume.py", description=__doc__.split("\n\n")[0], epilog=USAGE_HINT)
    p.add_argument("--usage", action="help", help="show this help message and exit (-h/--help outside Slicer)")
    p.add_argument("--input", required=True, help="volume file (NRRD, NIfTI, MHA...), a DICOM folder, or sample:chest-ct")
    p.add_argument("--prompts", required=True, nargs="+", help="prompt JSON and/or Slicer .mrk.json files")
    p.add_argument("--output", required=True, help="segmentation file to write (.seg.nrrd)")
    p.add_argument("--model", default=None, help="named model (default robustmedsam; weights cached on first use)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (.pth/.safetensors) instead of a named model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--axis", default="k", help="slicing axis: k/j/i or axial/coronal/sagittal (default k)")
    p.add_argument("--intensity", default="auto",
                   help="auto (CT: the engine's default window; MR: percentiles), a window preset (wide, soft_tissue, "
                        "lung, bone, brain), MR, or LEVEL,WIDTH")
    p.add_argument("--stop-rule", default=None, help="consistency (default) or micro-sam")
    p.add_argument("--iou-threshold", type=float, default=None, help="default: the stop rule's")
    p.add_argument("--projection", default="auto", help="auto (the model's: boxes for box-trained models), mask, "
                                                         "box, points, points_and_mask, single_point")
    p.add_argument("--box-extension", type=float, default=None, help="default: the stop rule's")
    p.add_argument("--slice-range", type=int, nargs=2, metavar=("FIRST", "LAST"))
    p.add_argument("--no-propagation", action="store_true", help="segment only the prompted slices")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--report", help="also write per-slice predicted IoU and stop reasons as JSON")
    p.add_argument("--quiet", action="store_true")
    return p


def load_volume_node(scene, path: str):
    """A scalar volume node read by Slicer's storage node (files) or the engine's reader (DICOM folders)."""
    import slicer
    import slicer.util

    from RobustMedSAMLib.samples import resolve
    from RobustMedSAMLogic import volumes

    source = resolve(path)
    if not source.exists():
        raise FileNotFoundError(f"input volume not found: {source}")
    name = source.name.split(".")[0]
    if source.is_dir():
        from RobustMedSAMLib.volume_io import read_volume

        vol = read_volume(source)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, vol.array)
        node.SetIJKToRASMatrix(volumes.to_vtk(vol.ijk_to_ras))
        return node
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(source))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise ValueError(f"Slicer could not read the volume {source}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def save_segmentation(scene, segmentation_node, path: str, volume_node) -> None:
    import slicer

    out = Path(path)
    if not str(out).lower().endswith(".seg.nrrd"):
        raise ValueError(f"the output must be a .seg.nrrd file, got {out.name}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the output folder {out.parent} does not exist")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(out))
    storage.SetUseCompression(True)
    if not storage.WriteData(segmentation_node):
        raise OSError(f"Slicer could not write {out}")


def run(args: argparse.Namespace, scene=None, loaded=None) -> int:
    import slicer

    from RobustMedSAMLib.prompt_files import read_prompts
    from RobustMedSAMLogic import volumes
    from RobustMedSAMLogic.engine import CUSTOM_CHECKPOINT, EngineSession, ModelChoice
    from RobustMedSAMLogic.logic import RobustMedSAMBridgeLogic

    if scene is None:
        if getattr(slicer, "app", None) is not None:
            scene = slicer.mrmlScene
        else:
            from RobustMedSAMLogic.headless import make_headless_scene

            scene, _ = make_headless_scene()
    out = Path(args.output)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the output folder {out.parent} does not exist")
    volume_node = load_volume_node(scene, args.input)
    volume = volumes.volume_from_node(volume_node)
    objects = read_prompts([Path(p) for p in args.prompts], volume, args.axis)  # checked before any model work
    if args.checkpoint:
        choice = ModelChoice(args.model or CUSTOM_CHECKPOINT, args.checkpoint, args.device)
    else:
        choice = ModelChoice(args.model or "robustmedsam", "", args.device)
    engine = EngineSession(choice, loaded=loaded, in_process=True)  # batch mode: the engine in this process
    if loaded is None:
        bar = None
        if not args.quiet:
            from RobustMedSAMLib.progress import TextProgressBar

            bar = TextProgressBar("downloading weights")
        on_progress = None if bar is None else (
            lambda r: bar(int(r.done), int(r.total) if r.total else None) if "download" in r.message else None)
        engine.wait(engine.load(allow_download=not args.offline, on_progress=on_progress)).value()
        if bar is not None:
            bar.close()
    logic = RobustMedSAMBridgeLogic(scene, engine)

    def report(done, total, message):
        if not args.quiet:
            print(f"\r{done}/{total} {message}".ljust(60), end="", file=sys.stderr, flush=True)

    seg_node, ids, result = logic.segmentVolume(
        volume_node, objects, axis=args.axis, propagate=not args.no_propagation, iouThreshold=args.iou_threshold,
        projection=args.projection, boxExtension=args.box_extension, stopRule=args.stop_rule,
        sliceRange=tuple(args.slice_range) if args.slice_range else None, intensity=args.intensity, engine=engine,
        progress=report)
    if not args.quiet:
        print(file=sys.stderr)
    save_segmentation(scene, seg_node, args.output, volume_node)
    if args.report:
        Path(args.report).write_text(json.dumps({"input": args.input, "objects": result.report()}, indent=1))
    if not args.quiet:
        for obj in result.objects:
            print(f"{obj.name}: {int(obj.mask.sum())} voxels -> segment {ids[obj.name]}")
        print(f"wrote {args.output}")
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, scene=None, loaded=None) -> int:
    """Parse ``argv`` and run; returns the exit code (0 ok, 1 failure, 2 bad input, 3 weights missing)."""
    _ensure_import_path()
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["--"]:  # Slicer consumes its "--" (ignore the rest); plain Python passes it on
        argv = argv[1:]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        from RobustMedSAMLib.weights import WeightsError, WeightsNotAvailableError
    except ImportError as e:
        print(f"segment_volume: error: the RobustMedSAM engine cannot be imported ({e}); install the extension's "
              "Python packages (open the RobustMedSAM module once) and try again", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return run(args, scene, loaded)
    except WeightsNotAvailableError as e:
        print(f"segment_volume: {e}", file=sys.stderr)
        return EXIT_WEIGHTS
    except (WeightsError, ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"segment_volume: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (ValueError, KeyError, FileNotFoundError)) else EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - batch mode: one clear line, non-zero exit
        print(f"segment_volume: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
