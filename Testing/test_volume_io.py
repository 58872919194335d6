"""Geometry, reading and writing of volumes and segmentations on real files (slicerio's chest CT)."""
from __future__ import annotations

import datetime
import os
import stat
import subprocess
import uuid
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from support import geometry_variants, load_with_slicer

from RobustMedSAMLib.volume_io import Volume, VolumeError, ijk_to_slice, read_volume, resolve_axis, slice_to_ijk
from RobustMedSAMLib.segmentation_io import SegmentInfo, read_segmentation, write_segmentation

DATA = os.path.join(os.path.dirname(slicerio.__file__), "data")
CT_PATH = os.path.join(DATA, "CTChest4.nrrd")
SEG_PATH = os.path.join(DATA, "Segmentation.seg.nrrd")
RNG = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def ct_image():
    return sitk.ReadImage(CT_PATH)


@pytest.fixture(scope="module")
def ct():
    return read_volume(CT_PATH)


@pytest.fixture(scope="module")
def seg():
    return read_segmentation(SEG_PATH)


def _label_image(seg) -> sitk.Image:
    return Volume(seg.labels, seg.ijk_to_lps).to_sitk()


# ------------------------------------------------------------------------------------------- geometry
def test_read_keeps_sitk_geometry_and_matrix_conventions(ct, ct_image):
    assert ct.shape == tuple(reversed(ct_image.GetSize()))
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(ct_image))
    np.testing.assert_allclose(ct.spacing, ct_image.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ct.origin, ct_image.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ct.direction.ravel(), ct_image.GetDirection(), rtol=0, atol=1e-12)
    pts = RNG.uniform(-3, 130, size=(50, 3))
    expected = np.array([ct_image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in pts])
    np.testing.assert_allclose(ct.ijk_to_physical(pts), expected, atol=1e-9)
    np.testing.assert_allclose(ct.ijk_to_physical(pts, "ras"), expected * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(ct.ijk_to_ras, np.diag([-1, -1, 1, 1]) @ ct.ijk_to_lps)
    back = np.array([ct_image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in expected])
    np.testing.assert_allclose(ct.physical_to_ijk(expected), back, atol=1e-9)
    np.testing.assert_allclose(ct.physical_to_ijk(expected * [-1, -1, 1], "ras"), pts, atol=1e-9)
    for idx in [(0, 0, 0), (127, 5, 33), (64, 100, 17)]:
        np.testing.assert_allclose(ct.ijk_to_physical(np.array(idx, float)),
                                   ct_image.TransformIndexToPhysicalPoint(idx), atol=1e-9)
    # Slicer's own segmentation file for this CT states the same IJK-to-LPS matrix
    np.testing.assert_allclose(slicerio.read_segmentation(SEG_PATH, skip_voxels=True)["ijkToLPS"],
                               ct.ijk_to_lps, atol=1e-5)
    with pytest.raises(VolumeError, match="lps"):
        ct.ijk_to_physical(pts, "xyz")


def test_slicing_table_and_inverse(ct):
    vol = ct.with_array(ct.array.copy())
    k, j, i = 20, 70, 40
    value = vol.array[k, j, i]
    for axis, index, (x, y) in [(0, k, (i, j)), (1, j, (i, k)), (2, i, (j, k))]:
        assert vol.slice(axis, index)[y, x] == value
        along, xy = ijk_to_slice(np.array([[i, j, k]]), axis)
        assert along[0] == index and tuple(xy[0]) == (x, y)
        np.testing.assert_array_equal(slice_to_ijk(axis, index, xy), [[i, j, k]])
        assert vol.slice(axis, index).shape == vol.slice_shape(axis)
        rebuilt = vol.stack_slices(axis, [vol.slice(axis, n) for n in range(vol.num_slices(axis))])
        np.testing.assert_array_equal(rebuilt, vol.array)
    assert vol.slice_shape("k") == (128, 128) and vol.slice_shape("j") == (34, 128)
    vol.set_slice("i", 3, np.full(vol.slice_shape(2), 7))
    assert (vol.array[:, :, 3] == 7).all() and vol.array[:, :, 4].max() != 7
    with pytest.raises(VolumeError, match="outside 0..33"):
        vol.slice(0, 34)
    with pytest.raises(VolumeError, match="34 slices given"):
        vol.stack_slices(1, [vol.slice(0, 0)] * 34)


@pytest.fixture(scope="module")
def variants(ct_image, seg):
    return geometry_variants(ct_image, _label_image(seg))


def _check_same_anatomy(variant: Volume, original: Volume, n=3000):
    """Voxel centres of ``variant`` hold the value of the original voxel at the same physical point."""
    idx = np.stack([RNG.integers(0, s, n) for s in variant.size_ijk], axis=1)
    phys = variant.ijk_to_physical(idx.astype(float))
    src = np.floor(original.physical_to_ijk(phys) + 0.5).astype(int)
    inside = np.all((src >= 0) & (src < original.size_ijk), axis=1)
    got = variant.array[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    want = original.array[src[inside, 2], src[inside, 1], src[inside, 0]]
    assert inside.sum() > n // 4
    agree = np.mean(got == want)
    assert agree == 1.0, f"only {agree:.4%} of voxels agree"


def _geometry_tolerance(ext):
    # NIfTI stores origin/spacing/orientation as float32: about 1e-5 mm at 300 mm from the origin
    return dict(origin=1e-4, spacing=1e-5, direction=1e-6) if ext.startswith(".nii") else \
        dict(origin=1e-6, spacing=1e-6, direction=1e-6)


@pytest.mark.parametrize("name", ["original", "flipped", "permuted", "anisotropic", "oblique"])
def test_round_trip_keeps_geometry_and_anatomy(name, variants, ct, seg, tmp_path):
    image, labels = variants[name]
    expected = Volume.from_sitk(image)
    original_labels = Volume(seg.labels, seg.ijk_to_lps)
    for ext in (".nii.gz", ".nrrd", ".mha"):
        path = tmp_path / f"{name}{ext}"
        sitk.WriteImage(image, str(path))
        vol = read_volume(path)
        tol = _geometry_tolerance(ext)
        np.testing.assert_allclose(vol.origin, expected.origin, rtol=0, atol=tol["origin"])
        np.testing.assert_allclose(vol.spacing, expected.spacing, rtol=0, atol=tol["spacing"])
        np.testing.assert_allclose(vol.direction, expected.direction, rtol=0, atol=tol["direction"])
        np.testing.assert_array_equal(vol.array, expected.array)
        _check_same_anatomy(vol, ct)
    # labels written by write_segmentation on this variant's geometry keep the anatomy too
    lab_array = sitk.GetArrayFromImage(labels)
    ref = read_volume(tmp_path / f"{name}.nrrd")
    for ext in (".seg.nrrd", ".nii.gz"):
        out = write_segmentation(tmp_path / f"labels{ext}", lab_array, ref, seg.segments)
        back = read_segmentation(out)
        np.testing.assert_array_equal(back.labels, lab_array)
        tol = _geometry_tolerance(ext)
        np.testing.assert_allclose(back.ijk_to_lps[:3, 3], ref.origin, atol=tol["origin"])
        np.testing.assert_allclose(back.ijk_to_lps[:3, :3], ref.ijk_to_lps[:3, :3], atol=tol["spacing"] * 10)
        _check_same_anatomy(back.volume, original_labels)


def test_permute_and_flip_change_axes_not_anatomy(variants, ct):
    # guards the test above: the variants really differ in voxel order
    for name in ("flipped", "permuted"):
        v = Volume.from_sitk(variants[name][0])
        assert v.shape != ct.shape or not np.array_equal(v.array, ct.array)
        assert not np.allclose(v.ijk_to_lps, ct.ijk_to_lps)


# ------------------------------------------------------------------------------------------- DICOM
def _write_dicom_series(image, folder, prefix="IMG", n_slices=None):
    """Write ``image`` (3D) as a CT DICOM series with explicit position/orientation tags."""
    os.makedirs(folder, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    study, series = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    common = {"0008|0020": now.strftime("%Y%m%d"), "0008|0030": now.strftime("%H%M%S"), "0008|0060": "CT",
              "0010|0010": "Test^Phantom", "0010|0020": "RMS001", "0020|000d": study, "0020|000e": series,
              "0008|103e": f"series {prefix}",
              "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depth = image.GetDepth() if n_slices is None else n_slices
    for k in range(depth):
        sl = image[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series}.{k + 1}")
        sl.SetMetaData("0018|0050", f"{image.GetSpacing()[2]:.6f}")
        writer.SetFileName(os.path.join(folder, f"{prefix}{k:04d}.dcm"))
        writer.Execute(sl)
    return series


@pytest.mark.parametrize("name", ["original", "oblique"])
def test_dicom_series_round_trip(name, variants, ct, tmp_path):
    image = variants[name][0]
    folder = tmp_path / "dicom"
    _write_dicom_series(image, folder)
    vol = read_volume(folder)
    expected = Volume.from_sitk(image)
    np.testing.assert_allclose(vol.origin, expected.origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, expected.spacing, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vol.direction, expected.direction, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(vol.array, expected.array)
    _check_same_anatomy(vol, ct)


def test_dicom_folder_with_two_series(ct_image, tmp_path):
    small = ct_image[:, :, :10]
    big_uid = _write_dicom_series(ct_image, tmp_path, prefix="A")
    small_uid = _write_dicom_series(small, tmp_path, prefix="B")
    with pytest.warns(UserWarning, match="2 DICOM series; reading the largest") as rec:
        vol = read_volume(tmp_path)
    assert small_uid in str(rec[0].message) and "series_uid" in str(rec[0].message)
    assert vol.shape == (34, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol_small = read_volume(tmp_path, series_uid=small_uid)
    assert vol_small.shape == (10, 128, 128)
    np.testing.assert_array_equal(vol_small.array, vol.array[:10])
    with pytest.raises(VolumeError, match="no DICOM series with UID 1.2.3"):
        read_volume(tmp_path, series_uid="1.2.3")
    assert big_uid != small_uid


# ------------------------------------------------------------------------------------------- axes
def test_resolve_axis_on_axial_coronal_sagittal_volumes(ct, variants):
    assert [ct.resolve_axis(a) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    assert [ct.resolve_axis(a) for a in ("k", "j", "i", 0, 1, 2, "AXIAL")] == [0, 1, 2, 0, 1, 2, 0]
    # PermuteAxes [2, 0, 1]: new i = old k (S), new j = old i (L), new k = old j (P)
    permuted = Volume.from_sitk(variants["permuted"][0])
    assert permuted.resolve_axis("axial") == 2       # i
    assert permuted.resolve_axis("sagittal") == 1    # j
    assert permuted.resolve_axis("coronal") == 0     # k: a coronal acquisition
    assert Volume.from_sitk(variants["oblique"][0]).resolve_axis("axial") == 0
    # sagittal acquisition: i = P, j = S, k = L
    sag = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
    assert [resolve_axis(a, sag) for a in ("axial", "coronal", "sagittal")] == [1, 2, 0]
    for bad in (3, "x", "oblique", True):
        with pytest.raises(VolumeError, match="axis"):
            ct.resolve_axis(bad)
    with pytest.raises(VolumeError, match="direction"):
        resolve_axis("axial")


# ------------------------------------------------------------------------------------------- read errors
def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_read_errors_name_file_problem_and_fix(ct_image, tmp_path):
    with pytest.raises(VolumeError, match="file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(VolumeError, match="is a 2D image"):
        read_volume(_write(ct_image[:, :, 5], tmp_path / "slice2d.nrrd"))
    four_d = sitk.JoinSeries([sitk.Cast(ct_image, sitk.sitkInt16)] * 2)
    with pytest.raises(VolumeError, match="is a 4D volume"):
        read_volume(_write(four_d, tmp_path / "four_d.nii.gz"))
    rgb = sitk.Compose([sitk.Cast(ct_image, sitk.sitkUInt8)] * 3)
    with pytest.raises(VolumeError, match=r"multi-component volume \(3 components per voxel, RGB"):
        read_volume(_write(rgb, tmp_path / "rgb.mha"))
    with pytest.raises(VolumeError, match="propagation needs at least 2 slices"):
        read_volume(_write(ct_image[:, :, 3:4], tmp_path / "one.nrrd"))
    arr = sitk.GetArrayFromImage(ct_image).astype(np.float32)
    arr[3, 4, 5] = np.nan
    nan_image = sitk.GetImageFromArray(arr)
    with pytest.raises(VolumeError, match="1 voxel\\(s\\) are NaN or infinite"):
        read_volume(_write(nan_image, tmp_path / "nan.mha"))
    const = sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16))
    with pytest.raises(VolumeError, match="same intensity \\(7\\)"):
        read_volume(_write(const, tmp_path / "const.nii"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(VolumeError, match="junk.nii.gz: could not be read"):
        read_volume(tmp_path / "junk.nii.gz")
    (tmp_path / "image.png").write_bytes(b"x")
    with pytest.raises(VolumeError, match="2D image format"):
        read_volume(tmp_path / "image.png")
    (tmp_path / "vol.xyz").write_bytes(b"x")
    with pytest.raises(VolumeError, match="unsupported format .xyz"):
        read_volume(tmp_path / "vol.xyz")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(VolumeError, match="no DICOM series found"):
        read_volume(empty)


# ------------------------------------------------------------------------------------------- segmentations
def test_seg_nrrd_round_trip_and_slicer_opens_it(seg, ct, tmp_path):
    assert len(seg.segments) == 7
    path = write_segmentation(tmp_path / "out.seg.nrrd", seg.labels, ct, seg.segments)
    back = read_segmentation(path)
    np.testing.assert_array_equal(back.labels, seg.labels)
    assert [(s.name, s.color, s.label_value) for s in back.segments] == \
        [(s.name, s.color, s.label_value) for s in seg.segments]
    np.testing.assert_allclose(back.ijk_to_lps, ct.ijk_to_lps, atol=1e-9)
    loaded, matrix = load_with_slicer(path)
    assert list(loaded) == [s.name for s in seg.segments]
    for s in seg.segments:
        color, count = loaded[s.name]
        np.testing.assert_allclose(color, s.color, atol=1e-6)
        assert count == np.count_nonzero(seg.labels == s.label_value) > 0
    np.testing.assert_allclose(matrix, ct.ijk_to_ras, atol=1e-6)


def test_slicer_reads_oblique_segmentation_geometry(variants, seg, tmp_path):
    image, labels = variants["oblique"]
    ref = Volume.from_sitk(image)
    lab = sitk.GetArrayFromImage(labels)
    path = write_segmentation(tmp_path / "oblique.seg.nrrd", lab, ref, seg.segments)
    loaded, matrix = load_with_slicer(path)
    np.testing.assert_allclose(matrix, ref.ijk_to_ras, atol=1e-6)
    for s in seg.segments:
        assert loaded[s.name][1] == np.count_nonzero(lab == s.label_value)


def test_nifti_label_round_trip(seg, ct, tmp_path):
    for ext in (".nii", ".nii.gz"):
        back = read_segmentation(write_segmentation(tmp_path / f"labels{ext}", seg.labels, ct, seg.segments))
        np.testing.assert_array_equal(back.labels, seg.labels)
        assert [s.name for s in back.segments] == [f"Segment_{v}" for v in range(1, 8)]
        check = read_volume(tmp_path / f"labels{ext}")
        np.testing.assert_allclose(check.ijk_to_lps, ct.ijk_to_lps, atol=1e-4)


def test_overlapping_segments_and_reference_resampling(seg, ct, tmp_path):
    overlapping = os.path.join(DATA, "SegmentationOverlapping.seg.nrrd")
    with pytest.raises(VolumeError, match="segments overlap .*overlap='last'"):
        read_segmentation(overlapping)
    merged = read_segmentation(overlapping, overlap="last")
    assert [s.name for s in merged.segments][-1] == "overlapping sphere"
    assert merged.labels.max() == 8 and np.count_nonzero(merged.labels == 8) > 0
    # a segmentation cropped to a sub-block (as Slicer may save it) goes back onto the CT grid
    crop = seg.labels[5:20, 30:90, 20:100]
    crop_matrix = ct.ijk_to_lps.copy()
    crop_matrix[:3, 3] = ct.ijk_to_physical(np.array([20.0, 30.0, 5.0]))
    cropped_ref = Volume(np.zeros(crop.shape, np.int16), crop_matrix)
    path = write_segmentation(tmp_path / "crop.seg.nrrd", crop, cropped_ref, seg.segments)
    full = read_segmentation(path, reference=ct)
    expected = np.zeros_like(seg.labels)
    expected[5:20, 30:90, 20:100] = crop
    np.testing.assert_array_equal(full.labels, expected)
    np.testing.assert_allclose(full.ijk_to_lps, ct.ijk_to_lps)


def test_write_checks_inputs(seg, ct, tmp_path):
    with pytest.raises(VolumeError, match="label value\\(s\\) \\[7\\] in the array have no SegmentInfo"):
        write_segmentation(tmp_path / "a.seg.nrrd", seg.labels, ct, seg.segments[:6])
    with pytest.raises(VolumeError, match="do not match the reference"):
        write_segmentation(tmp_path / "a.seg.nrrd", seg.labels[1:], ct, seg.segments)
    with pytest.raises(VolumeError, match="integer array"):
        write_segmentation(tmp_path / "a.seg.nrrd", seg.labels.astype(float), ct, seg.segments)
    with pytest.raises(VolumeError, match="unsupported segmentation format .png"):
        write_segmentation(tmp_path / "a.png", seg.labels, ct, seg.segments)
    with pytest.raises(VolumeError, match="colour must be 3 numbers in 0..1"):
        SegmentInfo("x", (255, 0, 0), 1)
    auto = read_segmentation(write_segmentation(tmp_path / "auto.seg.nrrd", seg.labels, ct))
    assert [s.name for s in auto.segments] == [f"Segment_{v}" for v in range(1, 8)]
    assert list(tmp_path.iterdir()) == [tmp_path / "auto.seg.nrrd"]


def test_unwritable_or_missing_output_dir_writes_nothing(seg, ct, tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(VolumeError, match="does not exist"):
        write_segmentation(missing / "out.seg.nrrd", seg.labels, ct, seg.segments)
    assert not missing.exists()
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    with pytest.raises(VolumeError, match="not a folder"):
        write_segmentation(not_dir / "out.nii.gz", seg.labels, ct, seg.segments)
    if os.path.isdir("/proc/self"):  # a real folder nobody (not even root) can create files in
        with pytest.raises(VolumeError, match="cannot write to the folder /proc/self"):
            write_segmentation("/proc/self/out.seg.nrrd", seg.labels, ct, seg.segments)
    # a read-only folder (chmod; for root, which ignores permissions, also the immutable attribute)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    immutable = False
    try:
        if os.geteuid() == 0:
            immutable = subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("running as root without chattr: cannot make a folder unwritable")
        with pytest.raises(VolumeError, match="cannot write to the folder"):
            write_segmentation(locked / "out.seg.nrrd", seg.labels, ct, seg.segments)
        assert list(locked.iterdir()) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        locked.chmod(stat.S_IRWXU)
    # failure at the final move: the temporary file is removed, the existing target untouched
    target = tmp_path / "taken.seg.nrrd"
    target.mkdir()
    with pytest.raises(VolumeError, match="a folder with this name exists"):
        write_segmentation(target, seg.labels, ct, seg.segments)
    out_dir = tmp_path / "atomic"
    out_dir.mkdir()
    final = out_dir / "seg.nii.gz"
    final.write_bytes(b"old content")
    write_segmentation(final, seg.labels, ct, seg.segments)
    assert [p.name for p in out_dir.iterdir()] == ["seg.nii.gz"]
    np.testing.assert_array_equal(read_segmentation(final).labels, seg.labels)


def test_dicom_missing_slice_warns_uneven_spacing(ct_image, tmp_path):
    _write_dicom_series(ct_image[:, :, :8], tmp_path)
    (tmp_path / "IMG0004.dcm").unlink()
    with pytest.warns(UserWarning, match="slice spacing is uneven \\(10 to 20 mm"):
        vol = read_volume(tmp_path)
    assert vol.shape[0] == 7
    with pytest.raises(VolumeError, match="is a single DICOM file; give the folder"):
        read_volume(tmp_path / "IMG0000.dcm")


def test_integer_labels_accepts_integral_values_and_names_the_problem():
    from RobustMedSAMLib.segmentation_io import integer_labels

    assert integer_labels(np.array([[True, False]]), "m").dtype == np.int32
    np.testing.assert_array_equal(integer_labels(np.array([0.0, 2.0]), "m"), [0, 2])
    for bad, why in [(np.array([0.5]), "non-integer"), (np.array([np.nan]), "non-integer"),
                     (np.array([-1]), "negative"), (np.array(["a"]), "type <U1")]:
        with pytest.raises(VolumeError, match=f"labels.nii: .*{why}"):
            integer_labels(bad, "labels.nii")
    with pytest.raises(KeyError):
        integer_labels(np.array([-3]), "x", KeyError)
