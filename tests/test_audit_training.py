"""Audit of training, pseudo-labels and corrections: each test reproduces one bug and FAILS until it is fixed.

Independent computations are written here (not taken from the package) wherever a value is compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from universal.data import load_manifest, write_phantom_dataset
from universal.errors import CheckpointError, InputError
from universal.train import train

CLASSES = ["spleen", "right kidney", "left kidney", "liver", "liver tumor", "lung tumor"]
LABEL_SETS = {
    "organs": ["liver", "spleen", "right kidney", "left kidney"],
    "liver_tumour": ["liver", "liver tumor"],
}
TINY = {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, (40, 40, 32), (3.0, 3.0, 3.0), LABEL_SETS)


def _cfg(manifest: Path, out: Path, **train_kw) -> dict:
    return {
        "model": {"classes": CLASSES, "encoder": "onehot", "kwargs": dict(TINY)},
        "data": {"train": str(manifest), "spacing_mm": 3.0, "patch_size": 16, "samples_per_case": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 1, "out_dir": str(out), "ckpt_every": 0, "progress": False,
                  "tensorboard": False, "resume": "auto", **train_kw},
    }  # fmt: skip


# BUG 1 (train.py _restore: resume with a changed config continues silently; the checkpoint then records the new
# seed / spacing for weights half trained with the old ones)
# fixed: _check_resumed_config refuses (CheckpointError naming key, old and new value) before any data is read
@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "seed", 7),
        ("data", "spacing_mm", 4.0),
        ("data", "patch_size", 32),
        ("loss", "bce_weight", 0.0),
    ],
)
def test_bug1_resume_refuses_a_changed_config(manifest, tmp_path, section, key, value):
    cfg = _cfg(manifest, tmp_path / "run")
    half = train(cfg, stop_after=1)
    assert half.step == 1
    changed = {**cfg, section: {**cfg.get(section, {}), key: value}}
    # the state file holds the config step 1 ran with, so the difference is known at resume time
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.state.pt", weights_only=True)["config"]
    assert saved[section][key] not in (value, [value] * 3)
    # right: refuse to continue (or start over, as resume=false would); today it continues silently
    with pytest.raises((CheckpointError, InputError)):
        train(changed)


def test_bug1_resumed_checkpoint_provenance_is_the_config_actually_used(manifest, tmp_path):
    from universal.model import load_checkpoint

    cfg = _cfg(manifest, tmp_path / "run", seed=0)
    train(cfg, stop_after=1)
    try:
        result = train({**cfg, "train": {**cfg["train"], "seed": 5}})
    except (CheckpointError, InputError):
        return  # fixed by refusing the resume
    ckpt = load_checkpoint(result.checkpoint)
    # step 1 used seed 0, step 2 seed 5: a checkpoint that says "seed 5" describes a run that never happened
    assert ckpt.spec.provenance.seed == 0, ckpt.spec.provenance.seed


# BUG 2 (pseudo.py _label_case/_pseudo_case: ground-truth classes the teacher does not predict vanish from the
# new manifest; the case silently loses annotated ground truth)
# fixed: each case's label map covers the teacher's classes and the case's ground-truth classes (pseudo._label_case)
def test_bug2_pseudo_label_keeps_ground_truth_the_teacher_does_not_predict(manifest, tmp_path):
    from universal.model import create_model
    from universal.predictor import Predictor
    from universal.preprocess import PreprocessConfig
    from universal.pseudo import PseudoLabelConfig, pseudo_label

    torch.manual_seed(0)
    teacher_classes = ["liver", "spleen"]
    model = create_model(
        "segresnet", classes=teacher_classes, encoder="onehot", embed_dim=2,
        embeddings=np.eye(2, dtype=np.float32), preprocessing=PreprocessConfig(spacing_mm=3.0), **TINY,
    ).eval()  # fmt: skip
    teacher = Predictor(model, patch_size=32, device="cpu")
    old = load_manifest(manifest)
    new_path, _ = pseudo_label(manifest, teacher, tmp_path / "ps", PseudoLabelConfig(min_confidence=0.0))
    new = load_manifest(new_path)
    for o, n in zip(old.cases, new.cases):
        lost = set(o.ground_truth_classes()) - set(n.ground_truth_classes())
        # right: every class the source case annotated is still ground truth in the new manifest
        assert not lost, f"case {o.name}: ground truth of {sorted(lost)} dropped"


# BUG 3 (corrections.py _case_name: two different case names that reduce to the same safe name replace each
# other without a word; the first corrected case is lost)
# fixed: the given name is stored (given_name); another given name with the same safe name is refused (InputError)
def test_bug3_corrections_do_not_replace_a_differently_named_case(tmp_path):
    from universal.corrections import list_cases, save_case
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(24, 24, 16), spacing=(6.0, 6.0, 6.0))
    save_case(tmp_path, ph.volume, ph.masks, ["liver"], name="patient 1")
    try:
        save_case(tmp_path, ph.volume, ph.masks, ["spleen"], name="patient/1")
    except InputError:
        return  # fixed by refusing the clash
    names = [c.name for c in list_cases(tmp_path)]
    assert len(names) == 2, f"two different cases saved, {names} kept"


# BUG 4 (train.py _ensure_phantom: data.phantom.val_cases is accepted and ignored when data.val is unset, so the
# run has no validation and says nothing)
# fixed: DataSection refuses val_cases unless data.val names the one manifest to write them to (InputError)
def test_bug4_phantom_val_cases_without_data_val_is_not_ignored(tmp_path):
    from universal.train import resolve_config

    cfg = _cfg(tmp_path / "ph" / "train.json", tmp_path / "run", steps=1)
    cfg["data"]["phantom"] = {"n_cases": 1, "shape": [32, 32, 24], "label_sets": {"organs": ["liver"]},
                              "val_cases": 1}  # fmt: skip
    try:
        resolve_config(cfg)
        result = train(cfg)
    except InputError:
        return  # fixed by refusing val_cases without data.val
    assert result.validation, "val_cases: 1 asked for validation; none was run and nothing was said"


# BUG 5 (data.py AugmentConfig.from_dict: probabilities outside [0, 1] are accepted; flip_lr: 50 (meaning 50 %)
# flips every patch, intensity_prob: -1 silently turns the augmentation off)
# fixed: AugmentConfig.__post_init__ refuses non-numbers, bools, probabilities outside [0, 1] and negative scales
@pytest.mark.parametrize("key,value", [("flip_lr", 50), ("intensity_prob", -1), ("flip_si", True)])
def test_bug5_augment_probabilities_are_checked(key, value):
    from universal.train import resolve_config

    with pytest.raises(InputError, match=key):
        resolve_config({"data": {"train": "t.json", "augment": {key: value}}})


# BUG 6 (pseudo.py pseudo_label: a run into a folder that holds an earlier run's output rewrites labels/ case by
# case and the manifest only at the end; when it fails half-way, the old manifest.json describes new label files)
# fixed: the output is written into a temporary sibling folder renamed into place at the end (io.atomic_folder)
def test_bug6_failed_pseudo_rerun_leaves_no_mixed_output(manifest, tmp_path):
    from universal.data import case_targets
    from universal.io import load_volume
    from universal.model import create_model
    from universal.predictor import Predictor
    from universal.preprocess import PreprocessConfig
    from universal.pseudo import PseudoLabelConfig, pseudo_label

    torch.manual_seed(0)
    model = create_model(
        "segresnet", classes=CLASSES, encoder="onehot", embed_dim=len(CLASSES),
        embeddings=np.eye(len(CLASSES), dtype=np.float32), preprocessing=PreprocessConfig(spacing_mm=3.0), **TINY,
    ).eval()  # fmt: skip
    out = tmp_path / "ps"
    everything = PseudoLabelConfig(min_confidence=0.0, empty_as_negative=True)
    first_path, _ = pseudo_label(manifest, Predictor(model, patch_size=32, device="cpu"), out, everything)
    first = load_manifest(first_path)
    case0 = first.cases[0]
    before = case_targets(case0, load_volume(case0.image), case0.annotated_classes())

    teacher = Predictor(model, patch_size=32, device="cpu", return_probabilities=True)
    calls = {"n": 0}
    real_predict = teacher.predict

    def failing_predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("teacher crashed on the second case")
        return real_predict(*args, **kwargs)

    teacher.predict = failing_predict
    with pytest.raises(RuntimeError):
        pseudo_label(manifest, teacher, out, PseudoLabelConfig(min_confidence=1.0))  # nothing pseudo accepted
    # what a training run now reads from the folder's manifest must still be the first run's labels
    now = load_manifest(out / "manifest.json").cases[0]
    after = case_targets(now, load_volume(now.image), now.annotated_classes())
    assert now.annotated_classes() == case0.annotated_classes()
    changed = [n for i, n in enumerate(case0.annotated_classes()) if not np.array_equal(before[i], after[i])]
    assert not changed, f"manifest.json of run 1 now decodes run 2's labels: {changed} changed"


# BUG 7 (train.py TrainSection.device / finetune.py FinetuneConfig.device: any non-empty text is accepted where it
# enters; "gpu" later fails inside torch.device with a RuntimeError, not a one-line InputError with exit code 2)
# fixed: both check the name with universal.predictor.device_name (auto, cpu, cuda, cuda:N, mps) where it enters
def test_bug7_device_names_are_checked_where_they_enter():
    from universal.finetune import FinetuneConfig
    from universal.train import resolve_config

    with pytest.raises(InputError, match="device"):
        resolve_config({"data": {"train": "t.json"}, "train": {"device": "gpu"}})
    with pytest.raises(InputError, match="device"):
        FinetuneConfig(device="gpu")


# BUG 8 (a training manifest's case name escapes its folder): a case named "../x" made pseudo-labelling write
# labels/../x.nii.gz outside its output folder. fixed: manifest case names follow the batch's rule (one line).
@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_bug8_manifest_case_names_that_leave_their_folder_are_refused(tmp_path, name):
    import json as _json

    from universal.data import load_manifest, validate_manifest
    from universal.errors import InputError as _InputError

    image = tmp_path / "ct.nii.gz"
    image.write_bytes(b"")
    manifest = tmp_path / "m.json"
    entry = {"image": "ct.nii.gz", "label": None, "dataset": "unlabeled"}
    if name:
        entry["name"] = name
    manifest.write_text(_json.dumps({"cases": [entry, {**entry, "name": "fine"}]}))
    if not name:  # no name: the image's name is used, which is fine
        assert not any("the name" in p for p in load_manifest(manifest).problems)
        return
    with pytest.raises(_InputError, match="the name"):
        validate_manifest(manifest, strict=True)
