"""Training settings checked where they enter: resumed configs, device names, augmentation, phantom validation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_train import LABEL_SETS, tiny_config

from universal.data import AugmentConfig, write_phantom_dataset
from universal.errors import CheckpointError, InputError
from universal.finetune import FinetuneConfig
from universal.predictor import DEVICE_NAMES, device_name
from universal.train import RESUME_MAY_CHANGE, resolve_config, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, (40, 40, 32), (3.0, 3.0, 3.0), LABEL_SETS)


def _cfg(manifest: Path, out: Path, **train_kw) -> dict:
    """test_train's tiny config, shortened: 2 steps of one patch."""
    cfg = tiny_config(manifest, out, **{"steps": 2, "batch_size": 1, "tensorboard": False, **train_kw})
    cfg["data"]["samples_per_case"] = 1
    return cfg


def _first_step_then_edit_state(cfg: dict, edit) -> None:
    """Train ``cfg``'s first step, then rewrite its training state with ``edit(state)`` (as older versions wrote it)."""
    train(cfg, stop_after=1)
    path = Path(cfg["train"]["out_dir"]) / "checkpoints" / "last.state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.slow  # a few short training runs
def test_resume_refusal_is_one_line_naming_key_old_and_new_value(manifest, tmp_path):
    cfg = _cfg(manifest, tmp_path / "run")
    train(cfg, stop_after=1)
    changed = copy.deepcopy(cfg)
    changed["train"]["seed"] = 7
    changed["loss"] = {"bce_weight": 0.5}
    with pytest.raises(CheckpointError) as err:
        train(changed)
    text = str(err.value)
    assert "\n" not in text
    assert "train.seed was 0, now 7" in text and "loss.bce_weight was 1.0, now 0.5" in text
    assert "train.resume: false" in text
    # nothing was trained or written by the refused run: the state still holds step 1 and the old seed
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["train"]["seed"] == 0
    # resume: false starts over with the new config
    fresh = train({**changed, "train": {**changed["train"], "resume": False}})
    assert fresh.resumed_from is None and fresh.step == 2


@pytest.mark.slow  # a few short training runs
def test_resume_allows_the_keys_that_do_not_change_the_weights(manifest, tmp_path):
    assert {"train.steps", "train.out_dir", "train.device", "train.log_every"} <= set(RESUME_MAY_CHANGE)
    cfg = _cfg(manifest, tmp_path / "run", steps=2)
    train(cfg, stop_after=1)
    more = copy.deepcopy(cfg)
    more["train"].update(steps=3, log_every=2, val_every=1, device="cpu", num_workers=0)
    more["data"]["cache"] = False
    result = train(more)
    assert result.resumed_from == 1 and result.step == 3


@pytest.mark.slow  # a few short training runs
def test_resume_checks_a_key_the_saved_config_lacks_against_its_default(manifest, tmp_path):
    cfg = _cfg(manifest, tmp_path / "run")
    # as an older schema without the key wrote it
    _first_step_then_edit_state(cfg, lambda state: state["config"]["loss"].pop("dice_on_empty"))
    with pytest.raises(CheckpointError, match="loss.dice_on_empty was true, now false"):
        train({**cfg, "loss": {"dice_on_empty": False}})
    assert train(cfg).resumed_from == 1  # the default equals the missing key: no change


@pytest.mark.slow  # a few short training runs
def test_resume_of_a_state_file_without_config_is_not_checked(manifest, tmp_path):
    cfg = _cfg(manifest, tmp_path / "run")
    _first_step_then_edit_state(cfg, lambda state: state.pop("config"))
    assert train({**cfg, "train": {**cfg["train"], "seed": 3}}).resumed_from == 1


# ------------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize(
    "given,name", [("cpu", "cpu"), (" CUDA:1 ", "cuda:1"), ("Auto", "auto"), ("mps", "mps")]
)
def test_device_names_are_normalised_alike_in_train_and_finetune(given, name):
    assert device_name(given) == name
    assert resolve_config({"data": {"train": "t.json"}, "train": {"device": given}}).train.device == name
    assert FinetuneConfig(device=given).device == name


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda:x", "", 0, True])
def test_bad_device_names_are_refused_with_the_names_allowed(bad):
    with pytest.raises(InputError, match="device") as err:
        device_name(bad)
    assert DEVICE_NAMES in str(err.value)
    with pytest.raises(InputError, match="train.device"):
        resolve_config({"data": {"train": "t.json"}, "train": {"device": bad}})
    with pytest.raises(InputError, match="device"):
        FinetuneConfig(device=bad)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_an_absent_mps_device_is_an_input_error_before_training(manifest, tmp_path):
    with pytest.raises(InputError, match="MPS"):
        train(_cfg(manifest, tmp_path / "run", device="mps"))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ augmentation
def test_augment_default_is_intensity_on_half_the_patches_and_no_flips():
    a = AugmentConfig.from_dict({})
    assert (a.flip_lr, a.flip_ap, a.flip_si, a.intensity_prob) == (0.0, 0.0, 0.0, 0.5)
    assert (a.intensity_scale, a.intensity_shift) == (0.1, 0.1)


def test_augment_accepts_the_bounds_and_converts_to_float():
    a = AugmentConfig.from_dict({"flip_lr": 1, "flip_ap": 0, "intensity_prob": 1.0, "intensity_scale": 2})
    assert a.flip_lr == 1.0 and isinstance(a.flip_lr, float) and a.intensity_scale == 2.0


@pytest.mark.parametrize(
    "key,value",
    [("flip_ap", 1.5), ("flip_lr", "0.5"), ("intensity_prob", float("nan")), ("intensity_scale", -0.1),
     ("intensity_shift", False)],
)  # fmt: skip
def test_augment_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(InputError, match=key):
        AugmentConfig(**{key: value})
    with pytest.raises(InputError, match=f"data.augment.*{key}"):
        resolve_config({"data": {"train": "t.json", "augment": {key: value}}})


# ------------------------------------------------------------------------------------------ phantom validation
def test_phantom_val_cases_need_exactly_one_val_manifest():
    ph = {"val_cases": 1}
    with pytest.raises(InputError, match="data.phantom.val_cases is 1 but data.val is not set"):
        resolve_config({"data": {"train": "t.json", "phantom": ph}})
    with pytest.raises(InputError, match="data.val lists 2 manifests"):
        resolve_config({"data": {"train": "t.json", "phantom": ph, "val": ["a.json", "b.json"]}})
    with pytest.raises(InputError, match="val_cases is -1; it must be an integer >= 0"):
        resolve_config({"data": {"train": "t.json", "phantom": {"val_cases": -1}, "val": "v.json"}})
    assert resolve_config({"data": {"train": "t.json", "phantom": {"val_cases": 0}}}).data.val is None


@pytest.mark.slow  # a few short training runs
def test_phantom_val_cases_with_data_val_write_and_run_validation(tmp_path):
    cfg = _cfg(tmp_path / "ph" / "train.json", tmp_path / "run", steps=1)
    cfg["data"]["phantom"] = {"n_cases": 1, "shape": [32, 32, 24], "label_sets": {"organs": ["liver"]},
                              "val_cases": 1}  # fmt: skip
    cfg["data"]["val"] = str(tmp_path / "val" / "val.json")
    result = train(cfg)
    assert (tmp_path / "val" / "val.json").is_file()
    assert len(result.validation) == 1 and "liver" in result.validation[0]["dsc"]
