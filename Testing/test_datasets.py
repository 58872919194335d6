"""Training data: MedSegBench files, folders, volumes, objects, prompts and clean/degraded pairing."""
from __future__ import annotations


import numpy as np
import pytest

from RobustMedSAMLib.preprocess import Preprocessing
from Training import datasets as D
from Training.synthetic import shape_sample, write_folder, write_medsegbench_npz

PREP = Preprocessing("sam", 256)


def _pairs(sources, **kw) -> D.TrainingPairs:
    kw.setdefault("train_size", 48)
    return D.TrainingPairs(sources, PREP, D.PairConfig(**kw))


# ----------------------------------------------------------------------------------------- MedSegBench
def test_npz_source_reads_splits_and_categories(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    labels = np.zeros((3, 16, 16), np.uint8)
    labels[0, 2:6, 2:6] = 1
    labels[2, 8:12, 8:12] = 1
    np.savez(tmp_path / "x_16.npz", test_images=images, test_label=labels,
             train_images_C1=images[:2], train_label_C1=labels[:2], train_images_C2=images, train_label_C2=labels)
    src = D.MedSegBenchSource(tmp_path / "x_16.npz", "test")
    assert len(src) == 3 and src.candidates() == [0, 2]  # the empty label is skipped
    item = src.item(2)
    assert item.image.shape == (16, 16, 3) and item.label[9, 9] == 1
    assert len(D.MedSegBenchSource(tmp_path / "x_16.npz", "train", "C1")) == 2
    with pytest.raises(D.DatasetError) as e:
        D.MedSegBenchSource(tmp_path / "x_16.npz", "train")
    msg = str(e.value)
    assert "train_images" in msg and "keys found: test_images, test_label, train_images_C1" in msg
    assert "sub-categories C1, C2" in msg


def test_npz_grey_images_and_idrib_layout(tmp_path):
    images = np.zeros((2, 8, 8), np.uint8)
    labels = np.ones((2, 8, 8), np.uint8)
    np.savez(tmp_path / "idrib_8.npz", val_images=images, val_label_C3=labels)
    src = D.MedSegBenchSource(tmp_path / "idrib_8.npz", "val", "C3")  # un-suffixed images, per-category labels
    assert src.item(1).image.shape == (8, 8)


def test_npz_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="not found"):
        D.resolve_medsegbench(tmp_path / "missing.npz")
    with pytest.raises(D.DatasetError, match="--download"):
        D.resolve_medsegbench("kvasir", size=256, root=tmp_path)
    import importlib.util

    if importlib.util.find_spec("medsegbench") is None:  # optional package: a clear message, no traceback
        with pytest.raises(D.DatasetError, match="pip install medsegbench"):
            D.resolve_medsegbench("kvasir", size=256, root=tmp_path, download=True)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DatasetError, match="not a readable"):
        D.MedSegBenchSource(tmp_path / "bad.npz")
    np.savez(tmp_path / "n.npz", train_images=np.zeros((3, 8, 8), np.uint8), train_label=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(D.DatasetError, match="3 images .* but 2 labels"):
        D.MedSegBenchSource(tmp_path / "n.npz")
    np.savez(tmp_path / "kvasir_64.npz", train_images=np.zeros((1, 8, 8), np.uint8),
             train_label=np.zeros((1, 8, 8), np.uint8))
    assert D.resolve_medsegbench("kvasir", size=64, root=tmp_path) == tmp_path / "kvasir_64.npz"
    with pytest.raises(D.DatasetError, match="empty"):  # only empty labels
        _pairs([D.MedSegBenchSource(tmp_path / "kvasir_64.npz")], corruptions=["clear"])


# ----------------------------------------------------------------------------------------- folders and volumes
def test_folder_source_matches_by_stem(tmp_path):
    images, masks = write_folder(tmp_path, n=3, size=32)
    src = D.FolderSource(images, masks)
    assert len(src) == 3 and [src.item(i).name for i in range(3)] == ["case0.png", "case1.png", "case2.png"]
    assert src.item(0).image.shape == (32, 32, 3) and set(np.unique(src.item(0).label)) == {0, 255}


def test_folder_mismatches_are_named(tmp_path):
    from PIL import Image

    images, masks = write_folder(tmp_path, n=2, size=32)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(images / "lonely.png")
    with pytest.raises(D.DatasetError, match="no mask .* for image.*lonely.png"):
        D.FolderSource(images, masks)
    (images / "lonely.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "orphan.png")
    with pytest.raises(D.DatasetError, match="orphan.png .* match no image"):
        D.FolderSource(images, masks)
    (masks / "orphan.png").unlink()
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(masks / "case1.png")
    with pytest.raises(D.DatasetError, match=r"case1.png has 32 x 20 pixels but image case1.png has 32 x 32"):
        D.FolderSource(images, masks)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.FolderSource(tmp_path / "nope", masks)


def test_folder_mask_suffix_and_nifti_2d(tmp_path):
    import SimpleITK as sitk

    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    image, label = shape_sample(24, 0, 0)
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.int16) * 10), str(tmp_path / "im" / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(tmp_path / "lb" / "a_seg.nii.gz"))
    src = D.FolderSource(tmp_path / "im", tmp_path / "lb", mask_suffix="_seg")
    item = src.item(0)
    assert item.image.dtype == np.uint8 and item.image.shape == (24, 24)
    assert np.array_equal(item.label, label)


def test_volume_gives_only_slices_with_objects(tmp_path):
    import SimpleITK as sitk

    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    vol = np.random.default_rng(0).normal(0, 100, (6, 20, 24)).astype(np.float32)
    lab = np.zeros((6, 20, 24), np.uint8)
    lab[2, 5:10, 5:10] = 1
    lab[4, 3:8, 10:20] = 2
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "img" / "ct.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "seg" / "ct.nrrd"))
    src = D.FolderSource(tmp_path / "img", tmp_path / "seg", modality="MR")
    assert src.entries == [(0, 2), (0, 4)]
    item = src.item(1)
    assert item.image.dtype == np.uint8 and item.image.shape == (20, 24) and item.name == "ct.nrrd#4"
    assert np.array_equal(item.label, lab[4])
    sitk.WriteImage(sitk.GetImageFromArray(lab[:, :, :20]), str(tmp_path / "seg" / "ct.nrrd"))
    with pytest.raises(D.DatasetError, match="ct.nrrd has shape .* but volume ct.nrrd"):
        D.FolderSource(tmp_path / "img", tmp_path / "seg")


# ----------------------------------------------------------------------------------------- objects and prompts
def test_largest_object_modes():
    label = np.zeros((10, 10), np.int32)
    label[0:2, 0:2] = 1  # 4 px
    label[5:9, 5:9] = 1  # 16 px, same value, not connected
    label[0:3, 6:9] = 2  # 9 px
    assert D.largest_object(label, "semantic").sum() == 16
    assert D.largest_object(label, "instance").sum() == 20  # value 1 as one object
    label[4, 4] = 2  # touches the 16 px block diagonally -> one binary component
    assert D.largest_object(label, "binary").sum() == 17
    assert D.largest_object(np.zeros((3, 3)), "semantic") is None


def test_points_inside_target_and_box_jitter_bounds():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 12:30] = True
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = D.sample_points(mask, 3, rng)
        assert len({tuple(p) for p in pts}) == 3 and all(mask[int(y), int(x)] for x, y in pts)
        x0, y0, x1, y1 = D.jittered_box(mask, 20, rng)
        assert 0 <= x0 <= 12 and 0 <= y0 <= 10 and 30 <= x1 <= 50 and 20 <= y1 <= 40
        assert x0 >= 12 - 20 and x1 <= 30 + 20
    assert D.jittered_box(mask, 0, rng).tolist() == [12, 10, 30, 20]
    tiny = np.zeros((5, 5), bool)
    tiny[2, 2] = True
    assert D.sample_points(tiny, 3, rng).tolist() == [[2, 2]] * 3


# ----------------------------------------------------------------------------------------- pairs
@pytest.fixture
def npz_source(tmp_path):
    return D.MedSegBenchSource(write_medsegbench_npz(tmp_path / "s_48.npz", counts=(6, 1, 1), size=48))


def test_pairs_are_deterministic_per_epoch_and_index(npz_source):
    a = _pairs([npz_source], seed=3)
    b = _pairs([npz_source], seed=3)
    s1, s2 = a[4], b[4]
    for k in ("clean", "degraded", "mask", "points", "box"):
        assert np.array_equal(s1[k].numpy(), s2[k].numpy()), k
    assert s1["corruption"] == s2["corruption"]
    a.set_epoch(1)
    changed = [not np.array_equal(a[i]["points"].numpy(), b[i]["points"].numpy()) for i in range(len(a))]
    assert all(changed)  # new prompts every epoch
    c = _pairs([npz_source], seed=4)
    assert not all(np.array_equal(c[i]["points"].numpy(), b[i]["points"].numpy()) for i in range(len(c)))


def test_pair_shapes_and_prompt_frame(npz_source):
    pairs = _pairs([npz_source], train_size=64, num_points=3)
    s = pairs[0]
    assert s["clean"].shape == (3, 256, 256) and s["degraded"].shape == (3, 256, 256)
    assert s["mask"].shape == (64, 64) and s["points"].shape == (3, 2) and s["point_labels"].tolist() == [1, 1, 1]
    rgb, target, _ = pairs.raw(0)
    pts = s["points"].numpy() / 4.0  # 64 px -> 256 px model frame
    assert all(target[int(round(y)), int(round(x))] for x, y in pts)
    assert s["mask"].numpy().astype(bool).tolist() == target.tolist()
    assert target.sum() == D.largest_object(D.resize_nearest(npz_source.item(0).label, (64, 64))).sum()


def test_corruption_pairing(npz_source):
    from RobustMedSAMLib import corruptions
    from RobustMedSAMLib.preprocess import prepare_image

    pairs = _pairs([npz_source])
    assert pairs.corruptions[0] == "clear" and len(pairs.corruptions) == 13
    assert set(pairs.corruptions[1:]) == set(n for n in corruptions.names() if n != "clear")
    for i in range(len(pairs)):
        sample = pairs[i]
        name, seed = pairs.view(i)
        rgb, _, _ = pairs.raw(i)
        assert pairs.corruptions[sample["corruption"]] == name
        expected = rgb if name == "clear" else corruptions.corrupt(rgb, name, severity=3, seed=seed)
        x_clean, _ = prepare_image(rgb, PREP)
        x_deg, _ = prepare_image(expected, PREP)
        assert np.array_equal(sample["clean"].numpy(), x_clean[0].numpy())
        assert np.array_equal(sample["degraded"].numpy(), x_deg[0].numpy())
        if name == "clear":
            assert np.array_equal(sample["clean"].numpy(), sample["degraded"].numpy())


def test_corruption_draw_is_uniform_and_fixed_views(npz_source):
    pairs = _pairs([npz_source])
    counts = {}
    for epoch in range(150):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            name = pairs.view(i)[0]
            counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(pairs.corruptions)
    total = sum(counts.values())
    assert all(abs(c / total - 1 / 13) < 0.03 for c in counts.values()), counts
    fixed = _pairs([npz_source], fixed_views=True)
    views = [fixed.view(i) for i in range(len(fixed))]
    fixed.set_epoch(7)
    assert [fixed.view(i) for i in range(len(fixed))] == views
    pairs.set_epoch(0)
    epoch0 = [pairs.view(i) for i in range(len(pairs))]
    pairs.set_epoch(1)
    assert [pairs.view(i) for i in range(len(pairs))] != epoch0  # without fixed views: new draws each epoch


def test_unknown_corruption_and_label_mode(npz_source):
    with pytest.raises(D.DatasetError, match="unknown corruption"):
        _pairs([npz_source], corruptions=["clear", "fog"])
    with pytest.raises(D.DatasetError, match="label mode"):
        _pairs([npz_source], label_mode="whatever")


def test_build_sources_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="no data given"):
        D.build_sources()
    with pytest.raises(D.DatasetError, match="in pairs"):
        D.build_sources(images=[str(tmp_path)], masks=[])
