"""Output formats (``universal.exports``): DICOM-SEG, RTSTRUCT, 3D Slicer ``.seg.nrrd`` and the HTML report, with
round trips on the real DICOM series ``../shared/data/ts_dicom_series``.

The segmentation is built from the series' own reference labels (TotalSegmentator ids → universal classes) plus a
block "liver tumor" inside the liver (so one class overlaps another, as tumours do) and two classes that are absent
there (empty masks): what the writers do is independent of where the masks came from, and this is fast.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from universal import exports, taxonomy
from universal.errors import InputError, InputWarning
from universal.inference import Segmentation, mask_file_stem
from universal.io import load_label, load_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ts_dicom_series"
SERIES = DATA / "dicom"
CLASSES = ["spleen", "right kidney", "liver", "stomach", "aorta", "pancreas", "gallbladder", "liver tumor"]
EMPTY = ("right kidney", "gallbladder")  # not in these 20 slices
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _need_data() -> None:
    if not SERIES.is_dir():
        pytest.skip(f"{SERIES} is absent: the export tests need ../shared beside the project")


def _segmentation(volume) -> Segmentation:
    lab = load_label(DATA / "labels_totalseg.nii.gz", like=volume)
    arr = taxonomy.transfer_labels(lab, "totalsegmentator_v2", volume.affine, classes=CLASSES)
    masks = {n: arr[i] for i, n in enumerate(CLASSES)}
    centre = np.argwhere(masks["liver"]).mean(axis=0).astype(int)
    tumour = np.zeros(volume.shape, bool)
    tumour[
        centre[0] - 20 : centre[0] + 20, centre[1] - 15 : centre[1] + 15, centre[2] - 4 : centre[2] + 4
    ] = True
    masks["liver tumor"] = tumour & masks["liver"]
    ml = {n: float(m.sum()) * float(np.prod(volume.spacing)) / 1000 for n, m in masks.items()}
    hu = {n: float(volume.array[m].mean()) if m.any() else float("nan") for n, m in masks.items()}
    info = {"model": "builtin", "template": "A computerized tomography of a {}", "backbone": "segresnet"}
    return Segmentation(
        masks=masks, volume=volume, volumes_ml=ml, mean_hu=hu, timings={"total": 1.5}, info=info
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The shared series, its segmentation and the case folder saved with every format."""
    _need_data()
    volume = load_volume(SERIES)
    seg = _segmentation(volume)
    out = tmp_path_factory.mktemp("exports") / "case"
    paths = seg.save(out, formats=exports.FORMATS)
    return volume, seg, out, paths


def _nifti_mask(out: Path, name: str) -> np.ndarray:
    """A saved NIfTI mask in the file's own voxel order (the source series' order)."""
    return np.asarray(nib.load(out / "masks" / f"{mask_file_stem(name)}.nii.gz").dataobj).astype(bool)


def _present() -> list[str]:
    return [n for n in CLASSES if n not in EMPTY and n != "liver tumor"] + ["liver tumor"]


def _source_instances(volume) -> dict[str, int]:
    """SOPInstanceUID (the file meta's, as these anonymised headers blank the data set's) → grid slice."""
    inv = np.linalg.inv(LPS @ volume.source.original_affine)
    out = {}
    for h in volume.source.headers:
        k = (inv @ np.r_[[float(v) for v in h.ImagePositionPatient], 1.0])[2]
        out[str(h.file_meta.MediaStorageSOPInstanceUID)] = int(round(k))
    return out


# ------------------------------------------------------------------------------------------------ formats
def test_parse_formats_orders_deduplicates_and_refuses_unknown_names():
    assert exports.parse_formats(None) == ("nifti",)
    assert exports.parse_formats("") == ("nifti",)
    assert exports.parse_formats("report, DICOM-SEG,report") == ("dicom-seg", "report")
    assert exports.parse_formats(["seg.nrrd", "nifti"]) == ("nifti", "seg.nrrd")
    with pytest.raises(InputError, match=r"'stl'.*nifti, dicom-seg, rtstruct, seg\.nrrd, report"):
        exports.parse_formats("nifti,stl")


def test_check_formats_refuses_dicom_formats_for_non_dicom_inputs(tmp_path):
    nii = tmp_path / "ct.nii.gz"
    nii.write_bytes(b"")
    exports.check_formats(("nifti", "seg.nrrd", "report"), [nii])  # any input
    exports.check_formats(("dicom-seg", "rtstruct"), [tmp_path, tmp_path / "series.zip"])  # folder, zip
    with pytest.raises(InputError, match=r"--format dicom-seg,rtstruct .*ct\.nii\.gz is not a DICOM series"):
        exports.check_formats(("nifti", "dicom-seg", "rtstruct"), [tmp_path, nii])


def test_every_class_has_snomed_codes_that_exist_in_pydicoms_dictionary():
    from pydicom.sr.codedict import codes

    sct = {}
    for keyword in codes.SCT.dir():
        c = getattr(codes.SCT, keyword)
        sct.setdefault(c.value, set()).add(c.meaning)
    for info in taxonomy.CLASSES:
        c = taxonomy.class_codes(info.name)
        assert c.category.meaning == (
            "Morphologically Abnormal Structure" if info.is_tumor else "Anatomical Structure"
        )
        for code in (c.category, c.type, c.modifier, c.region):
            if code is not None:
                assert code.scheme == "SCT" and code.meaning in sct.get(code.value, ()), (info.name, code)
        if info.side is not None:
            assert c.modifier is not None and c.modifier.meaning.lower() == info.side
    assert taxonomy.class_codes("liver tumor").type.meaning == "Neoplasm"
    assert taxonomy.class_codes("kidney cyst").region.meaning == "Kidney"


def test_broken_codes_in_a_taxonomy_copy_are_refused(tmp_path):
    raw = json.loads(taxonomy.TAXONOMY_PATH.read_text())
    raw["codes"]["liver"]["type"] = ["SCT", "10200004"]
    bad = tmp_path / "taxonomy.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(
        taxonomy.TaxonomyFileError, match=r"codes of 'liver': type must be \[scheme, value, meaning\]"
    ):
        taxonomy._load_taxonomy(bad)


# ------------------------------------------------------------------------------------------------ the case folder
def test_report_json_lists_formats_files_and_left_out_classes(case):
    _, _, out, paths = case
    report = json.loads((out / "report.json").read_text())
    outputs = report["outputs"]
    assert outputs["formats"] == list(exports.FORMATS)
    assert outputs["files"]["dicom-seg"] == ["segmentation.dcm"]
    assert outputs["files"]["nifti"] == ["masks", "labels.nii.gz"]
    assert outputs["left_out"]["dicom-seg"] == list(EMPTY) == outputs["left_out"]["rtstruct"]
    assert any("no SeriesInstanceUID" in n for n in outputs["notes"])  # the anonymised series: a derived UID
    assert {p.name for p in out.iterdir()} == {
        "masks", "labels.nii.gz", "report.json", "segmentation.dcm", "rtstruct.dcm", "segmentation.seg.nrrd",
        "report.html",
    }  # fmt: skip
    assert paths["dicom-seg"] == out / "segmentation.dcm" and paths["report"] == out / "report.json"


def test_saving_again_replaces_a_case_folder_with_every_format(case, tmp_path):
    _, seg, out, _ = case
    again = tmp_path / "case"
    shutil.copytree(out, again)
    paths = seg.save(again, formats="seg.nrrd")  # an earlier case folder with all formats may be replaced
    assert sorted(p.name for p in again.iterdir()) == ["report.json", "segmentation.seg.nrrd"]
    assert set(paths) == {"seg.nrrd", "report"}


def test_dicom_formats_of_a_nifti_input_are_refused_before_anything_is_written(tmp_path):
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(32, 32, 24), spacing=(5.0, 5.0, 5.0))
    seg = Segmentation(masks={"liver": ph.masks["liver"]}, volume=ph.volume)
    with pytest.raises(InputError, match="not a DICOM series"):
        seg.save(tmp_path / "case", formats="nifti,dicom-seg")
    with pytest.raises(InputError, match="reference the source DICOM series"):
        exports.write_rtstruct(seg, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ DICOM-SEG
def test_dicom_seg_reads_back_with_highdicom_identical_to_the_nifti_masks(case):
    import highdicom as hd

    volume, _, out, _ = case
    dcm = hd.seg.segread(out / "segmentation.dcm")
    labels = [s.SegmentLabel for s in dcm.SegmentSequence]
    assert labels == _present()  # organs first, tumours last; empty classes left out
    uids = _source_instances(volume)
    order = sorted(uids, key=uids.get)
    pixels = dcm.get_pixels_by_source_instance(order, segment_numbers=list(range(1, len(labels) + 1)))
    for s, name in enumerate(labels):
        expected = _nifti_mask(out, name)
        got = np.stack([pixels[i, :, :, s].T for i in range(len(order))], axis=-1).astype(bool)
        np.testing.assert_array_equal(got, expected, err_msg=name)
    liver = dcm.get_segment_description(labels.index("liver") + 1)
    assert liver.segmented_property_category.meaning == "Anatomical Structure"
    assert liver.segmented_property_type.value == "10200004"
    tumour = dcm.get_segment_description(labels.index("liver tumor") + 1)
    assert tumour.segmented_property_type.meaning == "Neoplasm"
    assert [c.meaning for c in tumour.anatomic_regions] == ["Liver"]
    assert (
        tuple(
            int(round(v))
            for v in hd.color.CIELabColor.from_dicom_value(liver.RecommendedDisplayCIELabValue).to_rgb()
        )
        == taxonomy.resolve_class("liver").color
    )
    assert liver.SegmentAlgorithmType == "AUTOMATIC" and liver.SegmentAlgorithmName == "universal"
    alg = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "universal" and alg.AlgorithmVersion == __import__("universal").__version__
    params = str(alg.AlgorithmParameters)
    assert "builtin" in params and "computerized tomography" in params
    assert str(dcm.SegmentationType) == "BINARY"


def test_dicom_seg_references_the_source_study_series_frame_and_every_instance(case):
    import highdicom as hd

    volume, _, out, _ = case
    dcm = hd.seg.segread(out / "segmentation.dcm")
    refs = exports.dicom_references(volume)
    (series,) = dcm.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == refs.series_uid
    assert dcm.StudyInstanceUID == refs.study_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == set(
        _source_instances(volume)
    )
    assert dcm.FrameOfReferenceUID == volume.source.headers[0].FrameOfReferenceUID
    with pytest.warns(InputWarning, match="no SeriesInstanceUID"):  # said at run time too, not only in the report
        again = exports.dicom_references(volume)
    assert again.series_uid == refs.series_uid  # derived once, the same every time


def test_dicom_seg_reads_back_with_load_label_as_the_label_map(case):
    volume, _, out, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", InputWarning
        )  # the tumour overlaps the liver: said, then painted over it
        got = load_label(out / "segmentation.dcm", like=volume)
    universal_ids = load_label(out / "labels.nii.gz", like=volume)
    expected = np.zeros(volume.shape, np.int32)
    for number, name in enumerate(_present(), start=1):
        expected[universal_ids == taxonomy.resolve_class(name).index] = number
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_uids_of_a_series_that_has_them_are_referenced_as_they_are(tmp_path):
    """A copy of the series with the study, series and instance UIDs its anonymiser removed."""
    import highdicom as hd
    import pydicom

    _need_data()
    folder = tmp_path / "series"
    folder.mkdir()
    study, series = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"
    for f in sorted(SERIES.iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID, ds.SOPClassUID = (
            ds.file_meta.MediaStorageSOPInstanceUID,
            ds.file_meta.MediaStorageSOPClassUID,
        )
        ds.save_as(folder / f.name)
    volume = load_volume(folder)
    seg = _segmentation(volume)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # nothing derived: nothing to warn about
        done = exports.write_dicom_seg(seg, tmp_path)
    assert not any("derived" in n for n in done.notes)
    dcm = hd.seg.segread(tmp_path / "segmentation.dcm")
    assert (dcm.StudyInstanceUID, dcm.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study, series)
    exports.write_rtstruct(seg, tmp_path)
    rt = pydicom.dcmread(tmp_path / "rtstruct.dcm")
    ref_study = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert rt.StudyInstanceUID == ref_study.ReferencedSOPInstanceUID == study
    assert ref_study.RTReferencedSeriesSequence[0].SeriesInstanceUID == series


# ------------------------------------------------------------------------------------------------ RTSTRUCT
def _rasterise(rt, number: int, slices: dict[str, int], affine: np.ndarray, shape) -> np.ndarray:
    """An ROI's contours filled on the source grid (even-odd: a contour inside another is a hole)."""
    from skimage.draw import polygon

    inv = np.linalg.inv(LPS @ affine)
    out = np.zeros(shape, bool)
    (item,) = [r for r in rt.ROIContourSequence if r.ReferencedROINumber == number]
    for c in item.ContourSequence:
        assert c.ContourGeometricType == "CLOSED_PLANAR"
        pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        assert len(pts) == c.NumberOfContourPoints
        ijk = (np.c_[pts, np.ones(len(pts))] @ inv.T)[:, :3]
        k = slices[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)  # on the slice it references
        filled = np.zeros(shape[:2], bool)
        rr, cc = polygon(ijk[:, 0], ijk[:, 1], shape[:2])
        filled[rr, cc] = True
        out[:, :, k] ^= filled
    return out


def test_rtstruct_contours_rasterise_back_to_the_masks(case):
    import pydicom

    volume, _, out, _ = case
    rt = pydicom.dcmread(out / "rtstruct.dcm")
    assert rt.Modality == "RTSTRUCT" and rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    rois = {r.ROIName: r.ROINumber for r in rt.StructureSetROISequence}
    assert list(rois) == _present()
    slices = _source_instances(volume)
    for name, number in rois.items():
        expected = _nifti_mask(out, name)
        got = _rasterise(rt, number, slices, volume.source.original_affine, expected.shape)
        dsc = 2 * np.count_nonzero(got & expected) / (np.count_nonzero(got) + np.count_nonzero(expected))
        assert expected.sum() > 1000 and dsc >= 0.95, (name, dsc)
    colours = {r.ReferencedROINumber: tuple(int(v) for v in r.ROIDisplayColor) for r in rt.ROIContourSequence}
    assert colours[rois["spleen"]] == taxonomy.resolve_class("spleen").color
    kinds = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    assert kinds[rois["liver"]] == "ORGAN" and kinds[rois["liver tumor"]] == ""


def test_rtstruct_references_every_source_instance_and_the_frame_of_reference(case):
    import pydicom

    volume, _, out, _ = case
    rt = pydicom.dcmread(out / "rtstruct.dcm")
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == volume.source.headers[0].FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == exports.dicom_references(volume).series_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(_source_instances(volume))


def test_contours_of_a_ring_keep_its_hole():
    ring = np.zeros((20, 20), bool)
    ring[3:17, 3:17] = True
    ring[8:12, 8:12] = False
    contours = exports._slice_contours(ring)
    assert len(contours) == 2  # the outer boundary and the hole
    from skimage.draw import polygon

    filled = np.zeros_like(ring)
    for c in contours:
        layer = np.zeros_like(ring)
        layer[polygon(c[:, 0], c[:, 1], ring.shape)] = True
        filled ^= layer
    np.testing.assert_array_equal(filled, ring)


# ------------------------------------------------------------------------------------------------ seg.nrrd
def _read_seg_nrrd(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    import nrrd

    data, header = nrrd.read(str(path), index_order="F")
    masks, i = {}, 0
    while f"Segment{i}_Name" in header:
        layer, value = int(header[f"Segment{i}_Layer"]), int(header[f"Segment{i}_LabelValue"])
        masks[header[f"Segment{i}_Name"]] = (data[layer] if data.ndim == 4 else data) == value
        i += 1
    return masks, header


def test_seg_nrrd_reads_back_identical_masks_names_and_colours(case):
    volume, _, out, _ = case
    masks, header = _read_seg_nrrd(out / "segmentation.seg.nrrd")
    assert list(masks) == _present()
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, _nifti_mask(out, name), err_msg=name)
    assert header["kinds"] == [
        "list",
        "domain",
        "domain",
        "domain",
    ]  # the tumour overlaps the liver: 2 layers
    i = list(masks).index("liver")
    rgb = [round(float(v) * 255) for v in header[f"Segment{i}_Color"].split()]
    assert tuple(rgb) == taxonomy.resolve_class("liver").color
    assert "SCT^10200004^Liver" in header[f"Segment{i}_Tags"]
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    lps = LPS @ volume.source.original_affine
    np.testing.assert_allclose(header["space directions"][1:], lps[:3, :3].T)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3])
    ext = [int(v) for v in header[f"Segment{i}_Extent"].split()]
    idx = np.argwhere(masks["liver"])
    assert ext == [int(v) for a in range(3) for v in (idx[:, a].min(), idx[:, a].max())]


def test_seg_nrrd_of_a_nifti_input_lies_on_its_own_voxel_order(tmp_path):
    """A LAS NIfTI file (x flipped): the .seg.nrrd keeps the file's voxel order and affine, like the masks."""
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(40, 40, 24), spacing=(4.8, 4.8, 6.0))
    affine = ph.affine.copy()
    affine[:, 0] *= -1
    affine[0, 3] = ph.affine[0, 3] + ph.affine[0, 0] * (ph.volume.shape[0] - 1)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ph.volume.array[::-1]), affine), path)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, ph.volume.array)
    names = ["liver", "liver tumor", "spleen", "pancreas"]
    seg = Segmentation(masks={n: ph.masks[n] for n in names}, volume=volume)
    seg.save(tmp_path / "case", formats="nifti,seg.nrrd")
    masks, header = _read_seg_nrrd(tmp_path / "case" / "segmentation.seg.nrrd")
    assert sorted(masks) == sorted(names)
    for name in names:
        np.testing.assert_array_equal(masks[name], _nifti_mask(tmp_path / "case", name))
        np.testing.assert_array_equal(masks[name], ph.masks[name][::-1])
    np.testing.assert_allclose(header["space directions"][1:], (LPS @ affine)[:3, :3].T, atol=1e-6)


# ------------------------------------------------------------------------------------------------ report
def test_report_html_has_the_notice_slices_table_and_model(case):
    import base64
    import io
    import re

    from PIL import Image

    _, seg, out, _ = case
    text = (out / "report.html").read_text()
    assert "Research software, not for clinical use" in text
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(pngs) == 3
    img = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert img.size[0] > 100 and img.mode == "RGB"
    assert (
        f"<td>{seg.volumes_ml['liver']:.1f}</td>" in text and f"<td>{seg.mean_hu['liver']:.0f}</td>" in text
    )
    assert "not found" in text  # the empty classes are listed as such
    assert "A computerized tomography of a {}" in text and "builtin" in text
    assert "http" not in text  # self-contained


def test_report_html_escapes_what_it_shows():
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(32, 32, 24), spacing=(5.0, 5.0, 5.0))
    seg = Segmentation(
        masks={"liver": ph.masks["liver"]}, volume=ph.volume, info={"model": "<script>x</script>"}
    )
    text = exports.report_html(seg)
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_export_bytes_gives_one_formats_file(case):
    _, seg, _, _ = case
    data = exports.export_bytes(seg, "seg.nrrd")
    assert data.startswith(b"NRRD")
    assert exports.export_bytes(seg, "dicom-seg")[128:132] == b"DICM"
    with pytest.raises(InputError, match="not a single file"):
        exports.export_bytes(seg, "nifti")


# ------------------------------------------------------------------------------------------------ front-ends
def _state_with_run(seg):
    from universal import app_logic as al
    from universal.app_state import DashboardState, InputRecord, RunRecord, RunSettings

    state = DashboardState()
    state.set_input(InputRecord(id="sample:x", volume=seg.volume))
    settings = RunSettings(
        weights=al.WeightsChoice("demo"), device="cpu", classes=tuple(seg.masks), fast=True
    )
    state.set_run(RunRecord(seg, "sample:x", settings))
    return state


def test_dashboard_downloads_offer_the_exports_of_a_dicom_input(case):
    import highdicom as hd
    import pydicom

    from universal import dashboard as dash

    volume, seg, _, _ = case
    state = _state_with_run(seg)
    try:
        files = {f.key: f for f in dash.downloads(state)}
    finally:
        state.folder.close()
    assert len(files) == len(dash.downloads(state))  # unique widget keys
    assert {"dl_labels", "dl_report", "dl_dicom-seg", "dl_rtstruct", "dl_seg_nrrd", "dl_report_html"} <= set(
        files
    )
    assert (
        files["dl_dicom-seg"].file_name == "dicom_seg.dcm"
        and files["dl_seg_nrrd"].file_name == "dicom.seg.nrrd"
    )
    dcm = hd.seg.segread(_bytes_io(files["dl_dicom-seg"].data()))  # made on click by the exports writer
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == _present()
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == exports.dicom_references(volume).series_uid
    rt = pydicom.dcmread(_bytes_io(files["dl_rtstruct"].data()))
    assert [r.ROIName for r in rt.StructureSetROISequence] == _present()
    assert b"Research software, not for clinical use" in files["dl_report_html"].data()


def test_dashboard_downloads_of_a_nifti_input_leave_the_dicom_formats_out():
    from universal import dashboard as dash
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(32, 32, 24), spacing=(5.0, 5.0, 5.0))
    state = _state_with_run(Segmentation(masks={"liver": ph.masks["liver"]}, volume=ph.volume))
    try:
        keys = [f.key for f in dash.downloads(state)]
        empty = _state_with_run(
            Segmentation(masks={"liver": np.zeros(ph.volume.shape, bool)}, volume=ph.volume)
        )
        empty_keys = [f.key for f in dash.downloads(empty)]
        empty.folder.close()
    finally:
        state.folder.close()
    assert "dl_seg_nrrd" in keys and "dl_report_html" in keys
    assert "dl_dicom-seg" not in keys and "dl_rtstruct" not in keys
    assert "dl_seg_nrrd" not in empty_keys and "dl_report_html" in empty_keys  # nothing found: no segments


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def test_cli_refuses_dicom_formats_of_a_nifti_input_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from universal import cli, predictor
    from universal.phantom import make_phantom

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(predictor, "Predictor", no_model)
    ph = make_phantom(shape=(32, 32, 24), spacing=(5.0, 5.0, 5.0))
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.volume.array, ph.affine), ct)
    out = tmp_path / "out"
    assert cli.main(["segment", str(ct), "-o", str(out), "--format", "nifti,rtstruct"]) == 2
    assert "--format rtstruct references the source DICOM series" in capsys.readouterr().err
    assert cli.main(["segment", str(ct), "-o", str(out), "--format", "nifti,stl"]) == 2
    err = capsys.readouterr().err
    assert "unknown output format 'stl'" in err and "dicom-seg" in err
    assert not out.exists()


def test_cli_help_lists_the_formats(capsys):
    from universal import cli

    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--format FORMATS" in text and "nifti, dicom-seg, rtstruct, seg.nrrd, report" in text


@pytest.mark.slow
def test_cli_segments_the_dicom_series_into_every_format(tmp_path):
    """The built-in model (fast) through ``universal segment --format``: the DICOM-SEG, RTSTRUCT and seg.nrrd of
    its masks read back like the NIfTI masks it wrote beside them."""
    import highdicom as hd

    from universal import cli

    _need_data()
    out = tmp_path / "out"
    argv = ["segment", str(SERIES), "-o", str(out), "--fast", "--classes", "liver", "spleen", "aorta"]
    assert cli.main([*argv, "--format", ",".join(exports.FORMATS)]) == 0
    case_dir = out / "dicom"
    report = json.loads((case_dir / "report.json").read_text())
    assert report["outputs"]["formats"] == list(exports.FORMATS)
    masks, _ = _read_seg_nrrd(case_dir / "segmentation.seg.nrrd")
    dcm = hd.seg.segread(case_dir / "segmentation.dcm")
    volume = load_volume(SERIES)
    uids = _source_instances(volume)
    order = sorted(uids, key=uids.get)
    labels = [s.SegmentLabel for s in dcm.SegmentSequence]
    assert "liver" in labels and sorted(labels) == sorted(masks)
    pixels = dcm.get_pixels_by_source_instance(order, segment_numbers=list(range(1, len(labels) + 1)))
    for s, name in enumerate(labels):
        expected = _nifti_mask(case_dir, name)
        np.testing.assert_array_equal(
            np.stack([pixels[i, :, :, s].T for i in range(len(order))], -1), expected
        )
        np.testing.assert_array_equal(masks[name], expected)


def test_a_zip_input_is_referenced_after_its_temporary_folder_is_gone(tmp_path):
    """The headers are kept in memory while loading, so a zip's instances are referenced after extraction."""
    import zipfile

    import highdicom as hd

    _need_data()
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(SERIES.iterdir()):
            zf.write(f, f"export/{f.name}")
    volume = load_volume(archive)
    assert volume.source.format == "dicom-zip" and len(volume.source.headers) == 20
    block = np.zeros(volume.shape, bool)
    block[200:260, 220:300, 3:9] = True
    seg = Segmentation(masks={"liver": block, "spleen": np.zeros(volume.shape, bool)}, volume=volume)
    done = exports.write_dicom_seg(seg, tmp_path)
    assert done.files == ("segmentation.dcm",) and done.left_out == ("spleen",)
    dcm = hd.seg.segread(tmp_path / "segmentation.dcm")
    refs = {i.ReferencedSOPInstanceUID for i in dcm.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(_source_instances(volume))
    nothing = Segmentation(masks={"liver": np.zeros(volume.shape, bool)}, volume=volume)
    skipped = exports.write_rtstruct(nothing, tmp_path / "empty")
    assert skipped.files == () and "no class was found" in skipped.notes[-1]
    assert not (tmp_path / "empty").exists()
