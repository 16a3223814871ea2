"""universal.taxonomy: the 32 classes, name resolution, FLARE23 view, dataset label maps and label transfer."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings

import numpy as np
import pytest

from universal import taxonomy as tx
from universal.errors import ClassNameError, InputError, UniversalError

OFFICIAL_ORDER = [
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "hepatic vessel",
    "right lung",
    "left lung",
    "colon",
    "intestine",
    "rectum",
    "bladder",
    "prostate",
    "left femoral head",
    "right femoral head",
    "celiac trunk",
    "kidney tumor",
    "liver tumor",
    "pancreas tumor",
    "hepatic vessel tumor",
    "lung tumor",
    "colon tumor",
    "kidney cyst",
]


# ---------------------------------------------------------------------------------------------------- classes


def test_names_in_official_order():
    assert tx.NUM_CLASSES == 32
    assert tx.class_names() == OFFICIAL_ORDER
    assert [c.index for c in tx.CLASSES] == list(range(1, 33))
    assert [c.name for c in tx.CLASSES] == OFFICIAL_ORDER


def test_class_info_fields():
    for c in tx.CLASSES:
        assert c.name == c.name.lower().strip()
        assert c.kind in ("organ", "tumor")
        assert len(c.color) == 3 and all(0 <= v <= 255 for v in c.color)
        assert c.prompt_name.lower() == c.prompt_name.lower().strip()
        if c.kind == "tumor":
            assert c.parent and all(tx.resolve_class(p).kind == "organ" for p in c.parent)
        else:
            assert c.parent == ()
        if c.paired is not None:
            other = tx.resolve_class(c.paired)
            assert other.paired == c.name
            assert {c.side, other.side} == {"right", "left"}
            assert c.name.startswith(c.side)
    # prompt names are correctly spelled; the official typos live only in official_prompt / aliases
    prompts = " ".join(c.prompt_name for c in tx.CLASSES)
    assert "Arota" not in prompts and "Truck" not in prompts
    assert tx.resolve_class("aorta").official_prompt == "Arota"
    assert tx.resolve_class("celiac trunk").official_prompt == "Celiac Truck"


def test_tumour_parents():
    parents = {c.name: c.parent for c in tx.CLASSES if c.kind == "tumor"}
    assert parents == {
        "kidney tumor": ("right kidney", "left kidney"),
        "liver tumor": ("liver",),
        "pancreas tumor": ("pancreas",),
        "hepatic vessel tumor": ("liver",),
        "lung tumor": ("right lung", "left lung"),
        "colon tumor": ("colon",),
        "kidney cyst": ("right kidney", "left kidney"),
    }


def test_colours_are_distinct():
    colours = np.array([c.color for c in tx.CLASSES], dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(dists) >= 35
    lut = tx.colormap()
    assert lut.shape == (33, 3) and lut.dtype == np.uint8
    assert tuple(lut[6]) == tx.resolve_class("liver").color and tuple(lut[0]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("liver", "liver"),
        ("LIVER", "liver"),
        ("  Liver   Tumour ", "liver tumor"),
        ("IVC", "inferior vena cava"),
        ("postcava", "inferior vena cava"),
        ("inferior_vena_cava", "inferior vena cava"),
        ("Gall Bladder", "gallbladder"),
        ("gall_bladder", "gallbladder"),
        ("Arota", "aorta"),
        ("Celiac Truck", "celiac trunk"),
        ("celiac-trunk", "celiac trunk"),
        ("Left Head of Femur", "left femoral head"),
        ("Head_of_femur_R", "right femoral head"),
        ("Portal Vein and Splenic Vein", "portal and splenic vein"),
        ("portal_vein_and_splenic_vein", "portal and splenic vein"),
        ("kidney_right", "right kidney"),
        ("Right-Kidney", "right kidney"),
        ("adrenal_gland_left", "left adrenal gland"),
        ("small bowel", "intestine"),
        ("small_bowel", "intestine"),
        ("urinary bladder", "bladder"),
        ("urinary_bladder", "bladder"),
        ("pancreatic tumor", "pancreas tumor"),
        ("renal cyst", "kidney cyst"),
        ("oesophagus", "esophagus"),
        (1, "spleen"),
        (32, "kidney cyst"),
        (np.int64(27), "liver tumor"),
    ],
)
def test_resolve_class(query, expected):
    assert tx.resolve_class(query).name == expected


def test_resolve_class_accepts_classinfo():
    info = tx.resolve_class("liver")
    assert tx.resolve_class(info) is info


def test_official_prompt_spellings_resolve(shared_reference):
    meta = json.loads((shared_reference / "clip_vitb32_official_prompt_embeddings.json").read_text())
    names = meta["class_names_as_prompted"]
    assert len(names) == 32
    for i, text in enumerate(names, start=1):
        assert tx.resolve_class(text).index == i, text
        assert tx.CLASSES[i - 1].official_prompt == text


@pytest.mark.parametrize("bad", ["livr", "kidny tumor", "spleeen"])
def test_unknown_name_suggests(bad):
    with pytest.raises(ClassNameError) as info:
        tx.resolve_class(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    assert "Did you mean" in msg
    expected = {"livr": "'liver'", "kidny tumor": "'kidney tumor'", "spleeen": "'spleen'"}[bad]
    assert expected in msg
    assert isinstance(info.value, UniversalError) and isinstance(info.value, KeyError)


@pytest.mark.parametrize("bad", [0, 33, -1, True, 2.5, None, "qqqqqqqq"])
def test_bad_class_inputs_raise(bad):
    with pytest.raises(ClassNameError):
        tx.resolve_class(bad)


def test_resolve_classes():
    assert [c.name for c in tx.resolve_classes(None)] == OFFICIAL_ORDER
    got = tx.resolve_classes(["IVC", "liver", "Liver", 9, "spleen"])
    assert [c.name for c in got] == ["inferior vena cava", "liver", "spleen"]
    assert [c.name for c in tx.resolve_classes("liver tumor")] == ["liver tumor"]
    with pytest.raises(ClassNameError):
        tx.resolve_classes(["liver", "nope"])


# ---------------------------------------------------------------------------------------------------- FLARE23


def test_flare23_view():
    classes = tx.flare23_classes()
    assert classes == {
        1: "liver",
        2: "right kidney",
        3: "spleen",
        4: "pancreas",
        5: "aorta",
        6: "inferior vena cava",
        7: "right adrenal gland",
        8: "left adrenal gland",
        9: "gallbladder",
        10: "esophagus",
        11: "stomach",
        12: "duodenum",
        13: "left kidney",
        14: "lesion",
    }
    tol = tx.flare23_tolerances_mm()
    assert [tol[i] for i in range(1, 15)] == [5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3, 2]
    assert set(tx.FLARE23_LESION_CLASSES) == {
        "kidney tumor",
        "liver tumor",
        "pancreas tumor",
        "hepatic vessel tumor",
        "lung tumor",
        "colon tumor",
    }
    assert set(tx.FLARE23.z_cropped) == {"aorta", "inferior vena cava", "esophagus"}
    classes[1] = "changed"  # a copy: the view itself is not mutated
    assert tx.flare23_classes()[1] == "liver"


def test_flare23_label_map_draws_lesion_over_organs():
    liver = np.zeros((6, 6, 6), bool)
    liver[1:5, 1:5, 1:5] = True
    tumour = np.zeros_like(liver)
    tumour[2, 2, 2] = True
    kidney = np.zeros_like(liver)
    kidney[5, 5, 5] = True
    out = tx.flare23_label_map({"liver tumor": tumour, "liver": liver, "left kidney": kidney})
    assert out[2, 2, 2] == 14 and out[1, 1, 1] == 1 and out[5, 5, 5] == 13 and out[0, 0, 0] == 0


# ---------------------------------------------------------------------------------------------------- datasets


REQUIRED_DATASETS = [
    "btcv",
    "amos22_ct",
    "word",
    "flare22",
    "flare23",
    "kits19",
    "kits23",
    "msd_liver",
    "msd_pancreas",
    "msd_spleen",
    "msd_colon",
    "msd_lung",
    "msd_hepaticvessel",
    "totalsegmentator_v2",
    "radiomics_lung_tumor",
    "dcmqi_liver",
]


def test_required_datasets_exist():
    assert set(REQUIRED_DATASETS) <= set(tx.list_datasets())


@pytest.mark.parametrize("name", tx.list_datasets())
def test_dataset_maps_are_consistent(name):
    d = tx.dataset(name)
    targets = {n for cls in d.labels.values() for n in cls} | {n for p in d.split_lr.values() for n in p}
    for n in targets:
        assert tx.resolve_class(n).name == n  # canonical names only
    assert set(d.annotated) == targets  # it annotates exactly the classes it claims
    assert list(d.annotated) == sorted(d.annotated, key=lambda n: tx.resolve_class(n).index)
    for v, (right, left) in d.split_lr.items():
        assert v in d.labels
        assert tx.resolve_class(right).side == "right" and tx.resolve_class(left).side == "left"
    assert 0 not in d.labels
    avail = d.availability()
    assert avail.shape == (32,) and avail.dtype == bool
    assert [n for n, a in zip(tx.class_names(), avail) if a] == list(d.annotated)
    # one-vs-all: a tumour value sets its parent whenever the parent is annotated
    for v, cls in d.labels.items():
        for n in cls:
            info = tx.resolve_class(n)
            if info.is_tumor and any(p in d.annotated for p in info.parent):
                assert set(info.parent) & (set(cls) | set(d.split_lr.get(v, ())))


def test_dataset_lookup_is_case_insensitive():
    assert tx.dataset("MSD Liver") is tx.dataset("msd_liver") is tx.dataset("Task03_Liver")
    assert tx.dataset("KiTS-23") is tx.dataset("kits23")
    assert tx.dataset("TotalSegmentator") is tx.dataset("totalsegmentator_v2")
    with pytest.raises(ClassNameError) as info:
        tx.dataset("kits2")
    assert "kits23" in str(info.value)


def test_specific_label_definitions():
    btcv = tx.dataset("btcv")
    assert {v: cls[0] for v, cls in btcv.labels.items()} == dict(enumerate(OFFICIAL_ORDER[:13], start=1))
    amos = tx.dataset("amos22_ct")
    assert amos.labels[9] == ("inferior vena cava",) and amos.labels[13] == ("duodenum",)
    assert amos.labels[14] == ("bladder",) and 15 in amos.unmapped
    assert tx.dataset("flare22").labels[1] == ("liver",) and tx.dataset("flare22").labels[13] == (
        "left kidney",
    )
    assert 14 in tx.dataset("flare23").unmapped
    word = tx.dataset("word")
    assert word.split_lr[12] == ("right adrenal gland", "left adrenal gland")
    assert word.labels[11] == ("intestine",) and word.labels[15] == ("left femoral head",)
    kits = tx.dataset("kits23")
    assert kits.split_lr[1] == ("right kidney", "left kidney")
    assert kits.labels[2] == ("kidney tumor",) and kits.labels[3] == ("kidney cyst",)
    assert tx.dataset("kits19").annotated == ("right kidney", "left kidney", "kidney tumor")
    assert tx.dataset("msd_liver").labels[2] == ("liver tumor", "liver")
    assert tx.dataset("msd_pancreas").labels[2] == ("pancreas tumor", "pancreas")
    assert tx.dataset("msd_spleen").annotated == ("spleen",)
    assert tx.dataset("msd_colon").annotated == ("colon tumor",)
    assert tx.dataset("msd_lung").annotated == ("lung tumor",)
    assert tx.dataset("msd_hepaticvessel").annotated == ("hepatic vessel", "hepatic vessel tumor")
    assert tx.dataset("radiomics_lung_tumor").labels == {1: ("lung tumor",)}
    assert tx.dataset("radiomics_lung_tumor").annotated == ("lung tumor",)
    assert tx.dataset("dcmqi_liver").labels == {1: ("liver",)}
    assert tx.dataset("dcmqi_liver").annotated == ("liver",)


def test_availability_subsets():
    lung = tx.dataset("msd_lung")
    avail = lung.availability()
    assert avail.sum() == 1 and avail[tx.resolve_class("lung tumor").index - 1]
    assert lung.availability(["liver", "Lung Tumour", "right lung"]).tolist() == [False, True, False]
    assert tx.dataset("btcv").availability().sum() == 13
    assert lung.annotates("lung tumor") and not lung.annotates("right lung")
    assert tx.dataset("kits23").values_for("left kidney") == (1, 2, 3)


def test_totalsegmentator_v2_map_matches_shared_ids(shared_data):
    ts = json.loads((shared_data / "totalsegmentator_v2_classes.json").read_text())
    ts = {int(k): v for k, v in ts.items()}
    d = tx.dataset("totalsegmentator_v2")
    for v in (*d.labels, *d.unmapped):
        assert d.source_names[v] == ts[v], v
    by_ts_name = {ts[v]: cls for v, cls in d.labels.items()}
    assert by_ts_name["liver"] == ("liver",)
    assert by_ts_name["spleen"] == ("spleen",)
    assert by_ts_name["kidney_right"] == ("right kidney",)
    assert by_ts_name["kidney_left"] == ("left kidney",)
    assert by_ts_name["small_bowel"] == ("intestine",)
    assert by_ts_name["urinary_bladder"] == ("bladder",)
    assert by_ts_name["portal_vein_and_splenic_vein"] == ("portal and splenic vein",)
    lobes = {n: cls for n, cls in by_ts_name.items() if n.startswith("lung_")}
    assert len(lobes) == 5
    for n, cls in lobes.items():
        assert cls == (("right lung",) if n.endswith("_right") else ("left lung",))
    assert by_ts_name["kidney_cyst_left"] == ("kidney cyst", "left kidney")
    # sided TS names map to the same side
    for n, cls in by_ts_name.items():
        for side in ("right", "left"):
            if n.endswith("_" + side):
                assert any(c.startswith(side) for c in cls), n
    # the whole femur is not the femoral head: deliberately unmapped
    femurs = [v for v, n in ts.items() if n.startswith("femur")]
    assert femurs and all(v not in d.labels and v in d.unmapped for v in femurs)
    assert {"liver", "spleen", "right kidney", "left kidney"} <= set(d.annotated)


# ---------------------------------------------------------------------------------------------------- transfer


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_transfer_one_vs_all_msd_liver():
    label = np.zeros((20, 20, 20), np.uint8)
    label[_ball(label.shape, (10, 10, 10), 7)] = 1
    label[_ball(label.shape, (10, 10, 10), 3)] = 2
    before = label.copy()
    masks = tx.transfer_labels(
        label, tx.dataset("msd_liver"), np.eye(4), classes=["liver tumor", "liver", "spleen"]
    )
    assert masks.shape == (3, 20, 20, 20) and masks.dtype == bool
    tumour, liver, spleen = masks
    assert np.array_equal(tumour, label == 2)
    assert np.array_equal(liver, label > 0)  # tumour voxels are liver too
    assert (tumour <= liver).all() and not spleen.any()
    np.testing.assert_array_equal(label, before)  # input not mutated
    full = tx.transfer_labels(label, "msd_liver", np.eye(4))
    assert full.shape == (32, 20, 20, 20)
    assert np.array_equal(full[tx.resolve_class("liver").index - 1], liver)


def _two_kidneys(shape=(40, 20, 20)):
    label = np.zeros(shape, np.int16)
    low = _ball(shape, (8, 10, 10), 4)  # small voxel index i
    high = _ball(shape, (31, 10, 10), 5)  # large voxel index i
    label[low] = 1
    label[high] = 1
    return label, low, high


def test_split_left_right_ras():
    label, low, high = _two_kidneys()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS+: i grows toward the patient's right
    right, left = tx.transfer_labels(label, "kits19", affine, classes=["right kidney", "left kidney"])
    assert np.array_equal(right, high) and np.array_equal(left, low)


def test_split_left_right_las_flipped():
    label, low, high = _two_kidneys()
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS: i grows toward the patient's left
    affine[0, 3] = 100.0
    right, left = tx.transfer_labels(label, "kits19", affine, classes=["right kidney", "left kidney"])
    assert np.array_equal(right, low) and np.array_equal(left, high)


def test_split_single_component_uses_image_centre():
    shape = (40, 20, 20)
    label = np.zeros(shape, np.int16)
    blob = _ball(shape, (30, 10, 10), 4)
    label[blob] = 12  # WORD adrenal (both sides in one label)
    masks = tx.transfer_labels(
        label, "word", np.eye(4), classes=["right adrenal gland", "left adrenal gland"]
    )
    assert np.array_equal(masks[0], blob) and not masks[1].any()
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    masks = tx.transfer_labels(label, "word", flipped, classes=["right adrenal gland", "left adrenal gland"])
    assert not masks[0].any() and np.array_equal(masks[1], blob)


def test_kidney_tumour_sets_the_kidney_of_its_side():
    label, low, high = _two_kidneys((48, 24, 24))
    touching = _ball(label.shape, (8, 10, 15), 3) & ~low  # tumour attached to the low-x (left) kidney
    label[touching] = 2
    detached = _ball(label.shape, (31, 10, 20), 1)  # tumour near the right kidney, not touching it
    assert not (detached & high).any()
    label[detached] = 2
    cyst = _ball(label.shape, (34, 10, 10), 2)
    label[cyst] = 3
    masks = tx.transfer_labels(
        label,
        "kits23",
        np.diag([1.5, 1.5, 1.5, 1.0]),
        ["right kidney", "left kidney", "kidney tumor", "kidney cyst"],
    )
    right, left, tumour, cyst_mask = masks
    assert np.array_equal(tumour, label == 2)
    assert np.array_equal(cyst_mask, cyst)
    assert (touching <= left).all() and not (touching & right).any()
    assert (detached <= right).all() and not (detached & left).any()
    assert (cyst <= right).all()
    assert np.array_equal(right | left, label > 0) and not (right & left).any()


def test_transfer_rejects_bad_input_and_warns_on_unknown_values():
    with pytest.raises(InputError):
        tx.transfer_labels(np.zeros((4, 4)), "btcv", np.eye(4))
    with pytest.raises(ClassNameError):
        tx.transfer_labels(np.zeros((4, 4, 4)), "no such dataset", np.eye(4))
    label = np.zeros((4, 4, 4), np.int16)
    label[0, 0, 0] = 99
    with pytest.warns(UserWarning, match="99"):
        out = tx.transfer_labels(label, "btcv", np.eye(4))
    assert not out.any()
    label[0, 0, 0] = 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tx.transfer_labels(label.astype(np.float32), "btcv", None, classes=["liver"])
    assert out.sum() == 1


def test_totalsegmentator_unmapped_values_are_silent():
    label = np.zeros((4, 4, 4), np.int16)
    label[0] = 30  # vertebrae_L2: a valid TS value without a universal class
    label[1] = 5  # liver
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tx.transfer_labels(label, "totalsegmentator_v2", np.eye(4), ["liver"])
    assert out.sum() == 16
    label[2] = 200  # not a TotalSegmentator v2 value
    with pytest.warns(UserWarning, match="200"):
        tx.transfer_labels(label, "totalsegmentator_v2", np.eye(4), ["liver"])


def test_totalsegmentator_lobes_and_cysts():
    label = np.zeros((10, 10, 10), np.int16)
    label[0, :, :] = 12  # lung_upper_lobe_right
    label[1, :, :] = 14  # lung_lower_lobe_right
    label[2, :, :] = 10  # lung_upper_lobe_left
    label[3, :, :] = 23  # kidney_cyst_left
    r, l_, cyst, lk = tx.transfer_labels(
        label, "totalsegmentator_v2", np.eye(4), ["right lung", "left lung", "kidney cyst", "left kidney"]
    )
    assert r[:2].all() and not r[2:].any()
    assert l_[2].all() and l_.sum() == 100
    assert cyst[3].all() and np.array_equal(lk, cyst)


# ---------------------------------------------------------------------------------------------------- label maps


def test_masks_to_label_map_draws_tumours_over_organs():
    liver = np.zeros((5, 5, 5), bool)
    liver[1:4, 1:4, 1:4] = True
    tumour = np.zeros_like(liver)
    tumour[2, 2, 2] = True
    spleen = np.zeros_like(liver)
    spleen[0, 0, 0] = True
    # tumour given first: still drawn on top
    out = tx.masks_to_label_map({"liver tumor": tumour, "liver": liver, "spleen": spleen})
    assert out.dtype == np.int16
    assert out[2, 2, 2] == 27 and out[1, 1, 1] == 6 and out[0, 0, 0] == 1 and out[4, 4, 4] == 0
    stacked = np.stack([tumour, liver])
    assert np.array_equal(
        tx.masks_to_label_map(stacked, ["liver tumor", "liver"]), np.where(tumour, 27, liver * 6)
    )
    assert np.array_equal(
        tx.masks_to_label_map({"liver tumor": tumour, "liver": liver}, classes=["liver"]),
        liver.astype(np.int16) * 6,
    )
    full = np.zeros((32, 5, 5, 5), bool)
    full[5] = liver
    assert np.array_equal(tx.masks_to_label_map(full), liver * 6)
    with pytest.raises(InputError):
        tx.masks_to_label_map(stacked)  # 2 rows without classes
    with pytest.raises(InputError):
        tx.masks_to_label_map(stacked, ["liver"])
    with pytest.raises(InputError):
        tx.masks_to_label_map({"liver": liver, "spleen": spleen[:2]})


def test_round_trip_label_map_transfer():
    """A universal label map is itself a dataset label map: transfer of BTCV-style labels gives them back."""
    label = np.zeros((6, 6, 6), np.int16)
    for i in range(1, 7):
        label[i - 1] = i
    masks = tx.transfer_labels(label, "btcv", np.eye(4), classes=OFFICIAL_ORDER[:6])
    assert np.array_equal(tx.masks_to_label_map(masks, OFFICIAL_ORDER[:6]), label)


# ---------------------------------------------------------------------------------------------------- broken file


def _broken_copy(tmp_path, edit):
    raw = json.loads(tx.TAXONOMY_PATH.read_text())
    edit(raw)
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(raw))
    return path


def test_packaged_file_loads():
    tax = tx._load_taxonomy(tx.TAXONOMY_PATH)
    assert [c.name for c in tax.classes] == OFFICIAL_ORDER


def _dup_index(raw):
    raw["classes"][1]["index"] = 1


def _unknown_parent(raw):
    raw["classes"][26]["parent"] = ["hepar"]


def _unknown_target(raw):
    raw["datasets"]["btcv"]["labels"]["1"] = ["splen"]


def _wrong_annotated(raw):
    raw["datasets"]["msd_lung"]["annotated"] = ["lung tumor", "right lung"]


def _alias_clash(raw):
    raw["classes"][0]["aliases"].append("IVC")


def _missing_parent_in_tumour_label(raw):
    raw["datasets"]["msd_liver"]["labels"]["2"] = ["liver tumor"]


def _bad_split(raw):
    raw["datasets"]["kits19"]["split_lr"]["1"] = ["left kidney", "right kidney"]


def _dup_name(raw):
    raw["classes"][2]["name"] = "right kidney"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_dup_index, "indices"),
        (_unknown_parent, "unknown parent 'hepar'"),
        (_unknown_target, "unknown class 'splen'"),
        (_wrong_annotated, "disagrees"),
        (_alias_clash, "'ivc'"),
        (_missing_parent_in_tumour_label, "one-vs-all"),
        (_bad_split, "[right, left]"),
        (_dup_name, "duplicate class names"),
    ],
)
def test_broken_taxonomy_file_gives_clear_error(tmp_path, edit, needle):
    path = _broken_copy(tmp_path, edit)
    with pytest.raises(tx.TaxonomyFileError) as info:
        tx._load_taxonomy(path)
    msg = str(info.value)
    assert str(path) in msg and needle in msg
    assert isinstance(info.value, UniversalError)


def test_unreadable_taxonomy_file(tmp_path):
    path = tmp_path / "taxonomy.json"
    path.write_text("{ not json")
    with pytest.raises(tx.TaxonomyFileError, match="JSON"):
        tx._load_taxonomy(path)
    with pytest.raises(tx.TaxonomyFileError, match="does not exist"):
        tx._load_taxonomy(tmp_path / "missing.json")
    shutil.copy(tx.TAXONOMY_PATH, tmp_path / "ok.json")
    assert tx._load_taxonomy(tmp_path / "ok.json").classes == tx.CLASSES
