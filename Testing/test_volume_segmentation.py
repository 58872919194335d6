"""The 3D pipeline on real data: the slicerio chest CT and its 7 segments, in five geometries.

A deterministic stand-in predictor (same ``predict`` interface as :class:`Predictor`) answers each prompt with
the reference mask of that slice inside the prompt's box, so propagation from one annotated slice must
reproduce every segment, and the written files must line up voxel for voxel with the input volume.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
from support import boxed_prediction, geometry_variants, load_with_slicer

from RobustMedSAMLib.prompt_files import ObjectPrompts, read_prompts
from RobustMedSAMLib.prompts import Prediction, Prompt, box_from_mask
from RobustMedSAMLib.propagation import PropagationCancelled
from RobustMedSAMLib.samples import sample_path
from RobustMedSAMLib.volume_io import Volume, read_volume
from RobustMedSAMLib.segmentation_io import read_segmentation, write_segmentation
from RobustMedSAMLib.volume_segmentation import (ObjectResult, SeedError, VolumeResult, segment_volume,
                                                  uint8_volume)


class OraclePredictor:
    """Answers every prompt with the reference mask of one object inside the prompt's box (the whole slice
    without a box). The slice is recognised by its content: the images it is given are slices of ``images``.
    """

    def __init__(self, images: np.ndarray, reference: np.ndarray, axis: int) -> None:
        self.lookup = {}
        for index in range(images.shape[axis]):
            key = self._key(np.take(images, index, axis=axis))
            self.lookup.setdefault(key, []).append(np.take(reference, index, axis=axis))
        self.calls = 0

    @staticmethod
    def _key(image):
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()

    def predict(self, prompt: Prompt, multimask: bool = False, image=None, context=None) -> Prediction:
        self.calls += 1
        candidates = self.lookup[self._key(image)]
        assert all(np.array_equal(c, candidates[0]) for c in candidates), "ambiguous slice content"
        return boxed_prediction(candidates[0], prompt, multimask)

    def prefetch(self, image, context=""):
        return None


@pytest.fixture(scope="module")
def variants():
    ct = sitk.ReadImage(str(sample_path("chest-ct")))
    seg = read_segmentation(sample_path("chest-ct-segmentation"), reference=read_volume(sample_path("chest-ct")))
    labels = Volume(seg.labels, seg.ijk_to_lps).to_sitk()
    names = {s.label_value: s.name for s in seg.segments}
    return {k: (Volume.from_sitk(a), Volume.from_sitk(b).array, names)
            for k, (a, b) in geometry_variants(ct, labels).items()}


def _prompts_file(volume: Volume, labels: np.ndarray, names, path, axis=0):
    """One box per segment on its largest slice along ``axis``, written as RAS corners (physical mm)."""
    objects = []
    for value, name in names.items():
        m = np.moveaxis(labels == value, axis, 0)
        if not m.any():
            continue
        index = int(np.argmax(m.reshape(m.shape[0], -1).sum(1)))
        x0, y0, x1, y1 = box_from_mask(m[index])
        xy = np.array([[x0, y0], [x1 - 1, y1 - 1]])
        ijk = np.zeros((2, 3))
        cols = {0: (0, 1, 2), 1: (0, 2, 1), 2: (1, 2, 0)}[axis]  # (x, y, slice) -> (i, j, k) positions
        ijk[:, cols[0]], ijk[:, cols[1]], ijk[:, cols[2]] = xy[:, 0], xy[:, 1], index
        ras = volume.ijk_to_physical(ijk, space="ras")
        objects.append({"name": name, "box": {"corners": ras.tolist()}})
    path.write_text(json.dumps({"coordinates": "ras", "objects": objects}))
    return path


# A window over the whole CT range keeps slices distinguishable by content (the oracle needs that).
FULL_RANGE = (1000, 4100)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("variant", ["original", "flipped", "permuted", "anisotropic", "oblique"])
def test_propagation_from_one_slice_reproduces_every_segment(variants, variant, tmp_path):
    volume, labels, names = variants[variant]
    images = uint8_volume(volume, window=FULL_RANGE)
    objects = read_prompts(_prompts_file(volume, labels, names, tmp_path / "prompts.json"), volume, axis=0)
    assert len(objects) == 7 and all(len(o.slices) == 1 for o in objects)
    results = []
    for obj in objects:
        value = next(v for v, n in names.items() if n == obj.name)
        oracle = OraclePredictor(images, labels == value, axis=0)
        # 10 mm slices: some segments overlap only ~3 % between neighbours at their ends, so this geometry
        # test stops on empty predictions only (micro-sam's rule, iou_threshold 0); the stop rules have their
        # own tests. The stand-in recognises native slices: no square-pixel resampling (tested on its own).
        result = segment_volume(volume, [obj], oracle, axis=0, images=images, box_extension=0.1, iou_threshold=0,
                                stop_rule="micro-sam", square_pixels=False)
        dice = _dice(result.objects[0].mask, labels == value)
        assert dice >= 0.95, f"{variant}: {obj.name} Dice {dice:.3f}"
        # each direction stops by itself: at most the object's extent + one rejected slice per side
        extent = np.flatnonzero((labels == value).any(axis=(1, 2)))
        assert oracle.calls <= extent[-1] - extent[0] + 3
        results += result.objects
    out, segments = VolumeResult(results, 0).labels()
    for path in (tmp_path / "out.seg.nrrd", tmp_path / "out.nii.gz"):
        write_segmentation(path, out, volume, segments)
        back = read_segmentation(path)
        np.testing.assert_array_equal(back.labels, out)
        np.testing.assert_allclose(back.ijk_to_lps, volume.ijk_to_lps, atol=1e-4 if path.suffix == ".gz" else 1e-9)
    if variant in ("original", "oblique"):
        slicer_view, ijk_to_ras = load_with_slicer(tmp_path / "out.seg.nrrd")
        assert {n: c for n, (_, c) in slicer_view.items()} == {s.name: int((out == s.label_value).sum())
                                                               for s in segments}
        np.testing.assert_allclose(ijk_to_ras, volume.ijk_to_ras, atol=1e-6)


@pytest.mark.parametrize("axis", [1, 2])
def test_other_slice_axes(variants, axis, tmp_path):
    volume, labels, names = variants["original"]
    images = uint8_volume(volume, window=FULL_RANGE)
    lung = {5: names[5]}
    objects = read_prompts(_prompts_file(volume, labels, lung, tmp_path / "p.json", axis=axis), volume, axis=axis)
    result = segment_volume(volume, objects, OraclePredictor(images, labels == 5, axis), axis=axis,
                            images=images, box_extension=0.1, iou_threshold=0, stop_rule="micro-sam",
                            square_pixels=False)
    assert _dice(result.objects[0].mask, labels == 5) >= 0.95


def test_cancel_returns_nothing_and_empty_seed_is_an_error(variants):
    volume, labels, names = variants["original"]
    images = uint8_volume(volume, window=FULL_RANGE)
    index = 20
    box = box_from_mask(labels[index] == 5)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(PropagationCancelled):
        segment_volume(volume, [ObjectPrompts("lung", None, {index: Prompt(box=box)})],
                       OraclePredictor(images, labels == 5, 0), images=images, cancel=cancel)
    empty = [ObjectPrompts("air", None, {index: Prompt(box=[0, 0, 5, 5])})]
    with pytest.raises(SeedError, match="'air' on slice 20 gave an empty mask"):
        segment_volume(volume, empty, OraclePredictor(images, labels == 5, 0), images=images)


def test_overlapping_objects_are_kept_in_seg_nrrd_layers(variants, tmp_path):
    volume, labels, _ = variants["original"]
    a = labels == 5
    b = np.zeros_like(a)
    b[15:25, 40:90, 60:100] = True  # overlaps the right lung
    assert (a & b).any()
    objects = [ObjectResult("lung", (0.5, 0.8, 0.9), a, None), ObjectResult("box", (0.9, 0.2, 0.2), b, None)]
    VolumeResult(objects, 0).write(tmp_path / "two.seg.nrrd", volume)
    counts, _ = load_with_slicer(tmp_path / "two.seg.nrrd")  # Slicer's own reader
    assert {n: c for n, (_, c) in counts.items()} == {"lung": int(a.sum()), "box": int(b.sum())}
    with pytest.warns(UserWarning, match="box overlaps earlier segments on"):
        VolumeResult(objects, 0).write(tmp_path / "two.nii.gz", volume)
    back = read_segmentation(tmp_path / "two.nii.gz").labels
    assert (back == 2).sum() == b.sum() and (back == 1).sum() == (a & ~b).sum()


def test_gpu_style_lookahead_encodes_ahead_and_gives_the_same_result(tiny_model):
    """With a lookahead (4 on CUDA), slices are encoded in batches in the propagation direction; the
    segmentation is the same as encoding one reached slice at a time (up to float rounding: a batched
    encoder pass rounds differently, ~1e-5 on the robust features, which can flip a pixel at the threshold)."""
    from RobustMedSAMLib.predictor import Predictor
    from RobustMedSAMLib.volume_segmentation import VolumeSegmenter, segment_object

    k, j, i = np.mgrid[:10, :64, :64]
    images = np.clip(60 + 120 * (((j - 32) / 18) ** 2 + ((i - 30) / 14) ** 2 < 1) + 3 * k, 0, 255).astype(np.uint8)
    obj = ObjectPrompts("blob", None, {5: Prompt(box=[14, 12, 46, 52])})
    results = {}
    for lookahead in (1, 3):
        predictor = Predictor(tiny_model)
        sizes = []
        original = predictor._encode_many
        predictor._encode_many = lambda imgs, keys, batch_size, _o=original: (sizes.append(len(imgs)),
                                                                         _o(imgs, keys, batch_size))[1]
        segmenter = VolumeSegmenter(predictor, images, 0, lookahead=lookahead)
        stack, _, prop = segment_object(segmenter, obj, iou_threshold=0.0)
        results[lookahead] = (stack, predictor.encoder_calls, prop)
        assert max(sizes) == lookahead
    one, batched = results[1][0], results[3][0]
    assert results[1][2].predicted == results[3][2].predicted  # the same slices, in the same order
    assert (one != batched).sum() <= one.size // 10000 and 2 * (one & batched).sum() / (one.sum() + batched.sum()) > 0.999
    reached = len(results[1][2].predicted) + 1  # every predicted slice plus the seed slice
    assert results[1][1] == reached
    assert reached <= results[3][1] <= reached + 2 * 2  # at most lookahead-1 wasted slices per direction


def test_prefetch_encodes_the_viewed_slice_first_then_its_neighbours(tiny_model):
    """While the user places prompts the effect prefetches the viewed slice; with neighbours (default on
    CUDA only) also the slices next to it, nearest first, within the volume."""
    from RobustMedSAMLib.acceleration import prefetch_neighbours
    from RobustMedSAMLib.predictor import Predictor
    from RobustMedSAMLib.volume_segmentation import VolumeSegmenter

    assert prefetch_neighbours("cpu") == 0 and prefetch_neighbours("cuda") == 1
    images = (np.arange(6 * 32 * 32) % 251).astype(np.uint8).reshape(6, 32, 32)
    predictor = Predictor(tiny_model)
    order = []
    original = predictor._encode_and_store
    predictor._encode_and_store = lambda image, key: (order.append(int(image[0, 0])), original(image, key))[1]
    segmenter = VolumeSegmenter(predictor, images, 0)
    first = {int(images[z, 0, 0]): z for z in range(6)}  # slice identified by its first pixel
    segmenter.prefetch(2)  # CPU default: the viewed slice only
    segmenter.prefetch(4, neighbours=2)  # 4, 5, 3, (6: none), (2: cached)
    segmenter.prefetch(0, neighbours=1)  # 0, 1, (-1: none)
    predictor.close()
    assert [first[v] for v in order] == [2, 4, 5, 3, 0, 1]
    assert predictor.encoder_calls == 6


class BrightInBox:
    """Answers with the pixels brighter than 127 inside the prompt's box, at whatever resolution it is given;
    records the image shapes and prompts it saw."""

    def __init__(self):
        self.seen = []

    def predict(self, prompt, multimask=False, image=None, context=None):
        self.seen.append((image.shape, prompt))
        mask = image > 127
        x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
        keep = np.zeros_like(mask)
        keep[y0:y1, x0:x1] = True
        return boxed_prediction(mask & keep, prompt)

    def prefetch(self, image, context=""):
        return None


def test_square_pixels_reach_the_model_and_results_come_back_on_the_voxel_grid():
    from RobustMedSAMLib.volume_segmentation import VolumeSegmenter

    images = np.zeros((10, 12, 40), np.uint8)  # axis j: slices (K=10, I=40) of 10 x 2.5 mm pixels
    images[2:7, :, 8:30] = 255                 # a block on rows 2..6, columns 8..29
    fake = BrightInBox()
    seg = VolumeSegmenter(fake, images, axis=1, voxel_spacing=(10.0, 1.0, 2.5))
    assert seg.resampled and seg.model_shape == (40, 40)  # 10 rows x 10 mm -> 40 rows of 2.5 mm
    pred = seg.predict_slice(5, Prompt(box=[8, 2, 30, 7]))
    shape, prompt = fake.seen[-1]
    assert shape == (40, 40)
    np.testing.assert_allclose(prompt.box, [8, 8, 30, 28])  # box edges scale with the rows
    assert pred.mask.shape == (10, 40)
    np.testing.assert_array_equal(pred.mask, images[:, 5, :] > 127)
    square = VolumeSegmenter(fake, images, axis=0, voxel_spacing=(10.0, 2.5, 2.5))
    assert not square.resampled and square.model_shape == (12, 40)


def test_an_object_window_maps_its_own_intensities(variants):
    from RobustMedSAMLib.intensity import Window

    volume, labels, names = variants["original"]
    box = box_from_mask(labels[20] == 5)
    fake = BrightInBox()
    objects = [ObjectPrompts("lung dark", None, {20: Prompt(box=box)}),
               ObjectPrompts("lung bright", None, {20: Prompt(box=box)}, window=Window(-1400, 1000))]
    result = segment_volume(volume, objects, fake, propagate_volume=False, window="wide")
    dark, bright = (o.mask[20] for o in result.objects)
    lung = labels[20] == 5
    assert dark[lung].mean() < 0.05  # lung air is dark in the wide window
    assert bright[lung].mean() > 0.9  # ... and above 127 in a window ending at -900 HU
