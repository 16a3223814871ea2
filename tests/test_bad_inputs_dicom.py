"""Bad-input catalogue, DICOM part: the DICOM folders, zips and files clinics send, each run through
``universal segment`` (CLI kinds, with a tiny random checkpoint) or ``universal.io.load_volume`` (API kinds), with
the house rules of :func:`badinput.check_kind` (one clear line, the right exit code, inputs unchanged, nothing
left behind). ``before`` says what main did before this round (recorded with the same inputs).

The inputs are made by the makers of ``tests/test_dicom_inputs.py`` from the real series in ``../shared``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from badinput import Kind, check_kind, tiny_checkpoint
from test_dicom_inputs import (
    as_rgb,
    dropping,
    encode,
    enhanced,
    on_slice,
    scramble_header,
    setting,
    slices,
    stored_as_hu,
    tilted,
    truncate,
    two_series,
    without_rescale,
    write_series,
    zip_folder,
)

from universal.errors import InputError

_CKPT: dict[str, Path] = {}


def _tiny_ckpt(tmp_path: Path) -> Path:
    """A tiny random checkpoint (made once per module)."""
    if "path" not in _CKPT:
        folder = tmp_path.parent / "tiny-ckpt"
        folder.mkdir(exist_ok=True)
        _CKPT["path"] = tiny_checkpoint(folder / "tiny.pt", ["liver", "spleen"])
    return _CKPT["path"]


def _cli(build, *extra: str):
    """A CLI kind: ``universal segment INPUT -o OUT --weights tiny.pt [extra]`` on the input ``build(tmp) -> path``."""

    def make(tmp_path: Path) -> dict[str, Any]:
        src = build(tmp_path / "in")
        out = tmp_path / "out"
        argv = ["segment", src, "-o", out, "--weights", _tiny_ckpt(tmp_path), *extra]
        return {"argv": argv, "inputs": [src], "out": out}

    return make


def _api(build, **kw: Any):
    """An API kind: ``load_volume(build(tmp), **kw)``."""

    def make(tmp_path: Path) -> dict[str, Any]:
        from universal.io import load_volume

        src = build(tmp_path / "in")
        return {"call": lambda: load_volume(src, **kw), "inputs": [src]}

    return make


def _series(edit=None, **kw: Any):
    return lambda d: write_series(d, edit, **kw)


def _damaged(damage, name: str = "s07.dcm"):
    def build(d: Path) -> Path:
        write_series(d)
        damage(d / name)
        return d

    return build


def _split(d: Path) -> Path:
    write_series(d / "A", lambda i, ds: ds if i < 10 else None)
    write_series(d / "B", lambda i, ds: ds if i >= 10 else None)
    (d / "README.txt").write_text("exported by PACS")
    return d


def _mixed_sizes(d: Path) -> Path:
    write_series(d, dropping(5))
    write_series(d.parent / "small", lambda i, ds: ds if i == 5 else None, step=8)
    shutil.copy(d.parent / "small" / "s05.dcm", d / "s05.dcm")
    return d


def _with_localizer(d: Path) -> Path:
    write_series(d)
    scout = slices()[0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    encode(d / "scout.dcm", scout, None)
    return d


def _zip_damaged(d: Path) -> Path:
    write_series(d)
    truncate(d / "s03.dcm")
    return zip_folder(d, d.parent / "case.zip")


def _no_decoder(tmp_path: Path) -> dict[str, Any]:
    from universal.io import load_volume

    src = write_series(tmp_path / "in", syntax="1.2.840.10008.1.2.4.70")

    class Missing:
        is_available = False

    def call() -> Any:
        with mock.patch("pydicom.pixels.get_decoder", lambda uid: Missing()):
            return load_volume(src)

    return {"call": call, "inputs": [src]}


def _duplicate(d: Path) -> Path:
    return write_series(d, on_slice(5, ImagePositionPatient=slices()[4].ImagePositionPatient))


def _partial_rescale(d: Path) -> Path:
    return write_series(d, lambda i, ds: without_rescale(i, ds) if i == 4 else ds)


_ORIENTATION = [1, 0, 0, 0, 0.9848078, -0.1736482]

KINDS = [
    # damaged and missing slices
    Kind("corrupt-slice-truncated", _cli(_damaged(truncate)), code=2, fragment=r"s07\.dcm is damaged",
         before="ok: masks on a 19-slice 2.11 mm grid (warning 'unevenly spaced' only)"),
    Kind("corrupt-slice-header", _cli(_damaged(scramble_header)), code=2, fragment=r"s07\.dcm is damaged",
         before="ok: masks on a 19-slice 2.11 mm grid (warning 'unevenly spaced' only)"),
    Kind("corrupt-slice-in-zip", _api(_zip_damaged), raises=InputError, fragment=r"case\.zip: the DICOM file s03\.dcm is damaged",
         before="ok: 19 slices on a 2.11 mm grid (warning 'unevenly spaced' only)"),
    Kind("missing-slice", _cli(_series(dropping(9))), code=0,
         warns=r"slices missing.*4\.00 mm between s10\.dcm \(-786\.50 mm\) and s08\.dcm.*20 slices, 2\.00 mm",
         before="ok: masks on a 19-slice 2.11 mm grid (warning 'unevenly spaced')"),
    Kind("gap-too-large", _api(_series(dropping(*range(5, 12)))), raises=InputError, fragment=r"gap of 16\.00 mm.*7 slices are missing",
         before="ok: 13 slices on a 3.17 mm grid (warning 'unevenly spaced')"),
    Kind("duplicate-position", _api(_duplicate), raises=InputError, fragment=r"lie at the same position",
         before="ok: 20 slices on a 2.00 mm grid (warning 'unevenly spaced')"),
    # several series
    Kind("two-series-default", _cli(two_series), code=0, warns=r"2 DICOM image series; took .*20 slices.*--series UID\|number",
         before="ok: the largest series, warning suggests series= (no CLI option)"),
    Kind("two-series-by-number", _cli(two_series, "--series", "3"), code=0,
         before="exit 2: argparse 'unrecognized arguments: --series 3'"),
    Kind("two-series-unknown", _cli(two_series, "--series", "9"), code=2, fragment=r"no DICOM series '9'.*thin subset', 6 slices",
         before="exit 2: argparse 'unrecognized arguments: --series 9'"),
    Kind("series-split-in-subfolders", _cli(_split), code=0,
         before="ok: only 10 of the 20 slices (each sub-folder taken as a series), warning"),
    # not a CT
    Kind("mr-series", _cli(_series(setting(Modality="MR"))), code=2, fragment=r"modality MR, not CT \(Modality tag\)",
         before="ok: segmented with a warning 'modality MR, not CT'"),
    Kind("pet-series", _api(_series(setting(Modality="PT"))), raises=InputError, fragment=r"modality PT, not CT",
         before="ok with a warning 'modality PT, not CT'"),
    Kind("rgb-series", _cli(_series(as_rgb)), code=2, fragment=r"s00\.dcm is a colour image \(RGB",
         before="exit 2: 'the DICOM series has 3 values per voxel (RGB...)' (no file named)"),
    # geometry
    Kind("gantry-tilt", _cli(_series(tilted(15.0))), code=2, fragment=r"stacked at 15\.0° to their own planes.*gantry tilt",
         before="ok: 'oblique voxel axes' warning; the tilt's shear ignored (wrong geometry)"),
    Kind("mixed-orientation", _api(_series(on_slice(5, ImageOrientationPatient=_ORIENTATION))), raises=InputError,
         fragment=r"do not share one orientation: s00\.dcm .* but s05\.dcm", before="ok, silently (one slice's orientation ignored)"),
    Kind("mixed-pixel-spacing", _api(_series(on_slice(5, PixelSpacing=[3.0, 3.0]))), raises=InputError,
         fragment=r"do not share one pixel spacing: s00\.dcm .* but s05\.dcm", before="ok, silently (one slice's spacing ignored)"),
    Kind("mixed-image-sizes", _api(_mixed_sizes), raises=InputError, fragment=r"differ in size: s00\.dcm is 64×64 but s05\.dcm is 32×32",
         before="InputError: ITK's 'ImageIO returns IO region that does not fully contain...' (no file named)"),
    Kind("no-image-position", _api(_series(lambda i, ds: (delattr(ds, "ImagePositionPatient"), ds)[1])), raises=InputError,
         fragment=r"s00\.dcm has no \(valid\) ImagePositionPatient", before="ok, silently, on a made-up 1 mm slice spacing"),
    Kind("localizer-in-series", _cli(_with_localizer), code=0, warns=r"left out 1 LOCALIZER image",
         before="ok: the scout stacked in as a 21st slice on a 1.00 mm grid (warning 'unevenly spaced')"),
    # rescale / HU
    Kind("no-rescale-raw-values", _cli(_series(without_rescale)), code=2, fragment=r"no RescaleSlope/RescaleIntercept.*Hounsfield units are unknown",
         before="exit 2: 'raw scanner values, not Hounsfield units' (no mention of the missing tags)"),
    Kind("no-rescale-stored-hu", _cli(_series(stored_as_hu)), code=0, warns=r"no RescaleSlope/RescaleIntercept \(HU unknown\)",
         before="ok, silently"),
    Kind("rescale-on-some-slices", _api(_partial_rescale), raises=InputError, fragment=r"s00\.dcm has RescaleSlope/RescaleIntercept but s04\.dcm has none",
         before="ok, silently (s04 left unscaled: 1024 HU off)"),
    # transfer syntaxes, multi-frame
    Kind("jpeg-lossless", _cli(_series(syntax="1.2.840.10008.1.2.4.70")), code=0, before="ok (SimpleITK's GDCM)"),
    Kind("no-decoder-plugin", _no_decoder, raises=InputError, fragment=r"JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70.*pip install python-gdcm",
         before="ok (SimpleITK's GDCM decoded it; pydicom's plugins unused)"),
    Kind("enhanced-multiframe-file", _cli(lambda d: enhanced(d / "ct.dcm")), code=0,
         before="exit 2: 'ct.dcm is a single DICOM file (one slice)'"),
    Kind("enhanced-without-positions", _api(lambda d: enhanced(d / "ct.dcm", positions=False)), raises=InputError,
         fragment=r"ct\.dcm \(frame 1\) has no \(valid\) ImagePositionPatient", before="exit 2: 'single DICOM file (one slice)'"),
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_dicom_bad_input(kind: Kind, tmp_path: Path) -> None:
    check_kind(kind, tmp_path)


def test_catalogue_size() -> None:
    assert len(KINDS) >= 15 and len({k.name for k in KINDS}) == len(KINDS)
