"""The `universal` command line, end to end on small files (random-weight checkpoints; no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from universal.cli import main
from universal.io import save_label_map, save_volume
from universal.model import create_model, save_checkpoint
from universal.phantom import make_phantom

CLASSES = ["liver", "spleen", "right kidney", "left kidney", "liver tumor"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0), seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, phantom):
    d = tmp_path_factory.mktemp("cli")
    ct = save_volume(phantom.volume, d / "case1.nii.gz")
    gt = save_label_map(phantom.label_map, phantom.volume, d / "case1_gt.nii.gz")
    torch.manual_seed(0)
    model = create_model("segresnet", classes=CLASSES, encoder="onehot")
    weights = save_checkpoint(model, d / "random.pt")
    return {"dir": d, "ct": Path(ct), "gt": Path(gt), "weights": Path(weights)}


def test_segment_writes_masks_labels_and_report(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(files["ct"]),
            "-o",
            str(out),
            "--weights",
            str(files["weights"]),
            "--classes",
            "liver",
            "Liver Tumor",
            "--fast",
        ]
    )
    assert rc == 0
    case = out / "case1"
    assert sorted(p.name for p in (case / "masks").iterdir()) == ["liver.nii.gz", "liver_tumor.nii.gz"]
    src = nib.load(files["ct"])
    mask = nib.load(case / "masks" / "liver.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    report = json.loads((case / "report.json").read_text())
    assert set(report["volumes_ml"]) == {"liver", "liver tumor"}
    assert "total" in report["timings"]
    assert (case / "labels.nii.gz").exists()
    assert "case1" in capsys.readouterr().out


def test_batch_failure_does_not_stop_other_cases(files, tmp_path, capsys):
    bad = tmp_path / "not_a_ct.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    out = tmp_path / "out"
    rc = main(
        [
            "segment",
            str(bad),
            str(files["ct"]),
            "-o",
            str(out),
            "--weights",
            str(files["weights"]),
            "--classes",
            "spleen",
            "--fast",
        ]
    )
    assert rc == 1  # some cases failed
    assert (out / "case1" / "masks" / "spleen.nii.gz").exists()
    err = capsys.readouterr().err
    assert "1 of 2 case(s) failed" in err and "not_a_ct.png" in err
    assert "Traceback" not in err


def test_unknown_class_is_one_clear_line(files, tmp_path, capsys):
    rc = main(
        [
            "segment",
            str(files["ct"]),
            "-o",
            str(tmp_path),
            "--weights",
            str(files["weights"]),
            "--classes",
            "livr",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert "liver" in err  # the closest valid name is suggested
    assert "Traceback" not in err


def test_corrupt_weights_file(files, tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    rc = main(["segment", str(files["ct"]), "-o", str(tmp_path), "--weights", str(bad)])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_evaluate_universal_label_maps_and_json(files, phantom, tmp_path, capsys):
    js = tmp_path / "m.json"
    rc = main(["evaluate", str(files["gt"]), str(files["gt"]), "--json", str(js)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert "liver" in data["classes"] and "liver tumor" in data["classes"]
    assert data["classes"]["liver"]["dsc"] == pytest.approx(1.0)
    assert data["mean"]["dsc"] == pytest.approx(1.0)
    assert "liver" in capsys.readouterr().out


def test_evaluate_segment_output_against_gt_flare23(files, tmp_path):
    out = tmp_path / "out"
    assert (
        main(["segment", str(files["ct"]), "-o", str(out), "--weights", str(files["weights"]), "--fast"]) == 0
    )
    js = tmp_path / "f.json"
    rc = main(["evaluate", str(out / "case1"), str(files["gt"]), "--json", str(js)])
    assert rc == 0
    data = json.loads(js.read_text())
    # only classes the prediction or the GT has appear; the random model is not expected to be good
    assert set(CLASSES) <= set(data["classes"])
    for v in data["classes"].values():
        assert v["dsc"] is None or 0.0 <= v["dsc"] <= 1.0


def test_evaluate_missing_path(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.nii.gz"), str(tmp_path / "gt.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_classes_and_models_listing(capsys):
    assert main(["classes"]) == 0
    out = capsys.readouterr().out
    assert "inferior vena cava" in out and "32" in out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "segresnet" in out and "CC BY-NC-ND" in out


def test_embed_onehot_to_file(tmp_path):
    f = tmp_path / "e.npy"
    assert main(["embed", "--encoder", "onehot", "--classes", "liver", "spleen", "-o", str(f)]) == 0
    e = np.load(f)
    assert e.shape == (2, 32) and e[0, 5] == 1 and e[1, 0] == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "segment" in capsys.readouterr().out


def test_console_entry_point_exit_code(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "universal.cli",
            "segment",
            str(tmp_path / "missing.nii.gz"),
            "-o",
            str(tmp_path),
            "--weights",
            str(tmp_path / "missing.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_train_set_overrides_then_pseudo_label_empty_option(tmp_path, monkeypatch, capsys):
    from universal.data import load_manifest, write_phantom_dataset
    from universal.model import load_checkpoint

    manifest = write_phantom_dataset(
        tmp_path / "ds", 2, (48, 48, 40), (3.0, 3.0, 3.0), {"organs": ["liver", "spleen"]}, unlabeled=1
    )
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "tiny.yaml"
    cfg.write_text(
        "model: {classes: [liver, spleen], encoder: onehot,\n"
        "        kwargs: {init_filters: 16, blocks_down: [1, 1, 1], blocks_up: [1, 1]}}\n"
        "data: {train: does_not_exist.json, spacing_mm: 3.0, patch_size: 16}\n"
        "train: {steps: 50, batch_size: 1, progress: false, ckpt_every: 0, out_dir: run}\n"
    )
    monkeypatch.chdir(tmp_path)  # --set paths are relative to the current folder, not the config's
    args = [
        "train",
        str(cfg),
        "--set",
        f"data.train={manifest.relative_to(tmp_path)}",
        "--set",
        "train.steps=2",
        "--set",
        "train.out_dir=myrun",
        "--set",
        "optim.lr=0.002",
    ]
    assert main(args) == 0
    saved = load_checkpoint(tmp_path / "myrun" / "model.pt")
    assert saved.checkpoint_extra["training"]["step"] == 2
    assert json.loads((tmp_path / "myrun" / "config.json").read_text())["optim"]["lr"] == 0.002
    assert main(["train", str(cfg), "--set", "train.steps"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    # one key given twice with different values: refused, not one of them winning in silence
    assert main(["train", str(cfg), "--steps", "5", "--set", "train.steps=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train.steps is given twice (--steps 5 and --set train.steps=7): give it once", err
    assert main(["train", str(cfg), "--set", "optim.lr=0.1", "--set", "optim.lr=0.2"]) == 2
    assert "optim.lr is given twice" in capsys.readouterr().err
    # an untrained model at threshold 0.9999 predicts nothing: "absent" annotates every class of the unlabeled
    # case as absent, "unannotated" leaves them masked
    common = [
        str(manifest),
        "--weights",
        "myrun/model.pt",
        "--threshold",
        "0.9999",
        "--device",
        "cpu",
        "--fast",
    ]
    assert main(["pseudo-label", *common, "-o", "absent", "--empty", "absent"]) == 0
    assert main(["pseudo-label", *common, "-o", "masked"]) == 0  # the default: left unannotated
    unlabeled = [c.name for c in load_manifest(manifest).cases if not c.annotated_classes()]
    assert unlabeled
    a, m = (
        load_manifest(tmp_path / "absent" / "manifest.json"),
        load_manifest(tmp_path / "masked" / "manifest.json"),
    )
    assert set(a[unlabeled[0]].annotated_classes()) == {"liver", "spleen"}
    assert m[unlabeled[0]].annotated_classes() == ()


def test_pseudo_label_uses_every_option_it_accepts(tmp_path, capsys):
    from universal.data import write_phantom_dataset
    from universal.preprocess import PreprocessConfig
    from universal.spec import InferenceDefaults

    manifest = write_phantom_dataset(
        tmp_path / "ds", 1, (48, 48, 40), (3.0, 3.0, 3.0), {"organs": ["liver", "spleen"]}, unlabeled=1
    )
    model = create_model(
        "segresnet",
        classes=["liver", "spleen"],
        encoder="onehot",
        embeddings=np.eye(2, dtype=np.float32),
        preprocessing=PreprocessConfig(spacing_mm=3.0),
        inference=InferenceDefaults(patch_size=(16, 16, 16)),
        init_filters=16,
        blocks_down=[1, 1, 1],
        blocks_up=[1, 1],
    )
    save_checkpoint(model, tmp_path / "m.pt")
    common = ["pseudo-label", str(manifest), "--weights", str(tmp_path / "m.pt"), "--device", "cpu"]
    args = [*common, "-o", str(tmp_path / "out"), "--fast", "--threshold", "0.9", "--min-confidence", "0.1"]
    assert main(args) == 0
    settings = json.loads((tmp_path / "out" / "quality_report.json").read_text())["settings"]
    assert settings["threshold"] == 0.9 and settings["min_confidence"] == 0.1
    assert settings["teacher"]["fast"] is True and settings["teacher"]["threshold"] == 0.9
    capsys.readouterr()
    for bad, word in ((["--threshold", "2"], "threshold"), (["--min-confidence", "1.5"], "min_confidence"),
                      (["--overlap", "1.0"], "overlap")):  # fmt: skip
        assert main([*common, "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and word in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # refused before any work


@pytest.mark.parametrize(
    ("option", "word"),
    [(["--overlap", "1.0"], "overlap"), (["--threshold", "0"], "threshold"), (["--device", "cuda:7"], "cuda:7"),
     (["--device", "npu"], "device")],
)  # fmt: skip
def test_segment_settings_are_checked_before_the_model_loads(
    files, tmp_path, capsys, monkeypatch, option, word
):
    import universal.model as um

    if option[-1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    monkeypatch.setattr(um, "load_pretrained", lambda name: pytest.fail("the model was loaded"))
    rc = main(["segment", str(files["ct"]), "-o", str(tmp_path / "o"), "--weights", "builtin", *option])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and word in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_segment_overlap_option_reaches_the_report(files, tmp_path):
    out = tmp_path / "out"
    args = ["segment", str(files["ct"]), "-o", str(out), "--weights", str(files["weights"]), "--fast"]
    assert main([*args, "--overlap", "0.6", "--threshold", "0.7"]) == 0
    report = json.loads((out / "case1" / "report.json").read_text())
    assert report["overlap"] == 0.6 and report["threshold"] == 0.7


def test_max_voxels_option_bounds_the_prepared_grid(files, tmp_path, capsys):
    args = ["segment", str(files["ct"]), "-o", str(tmp_path / "o"), "--weights", str(files["weights"]), "--fast"]
    assert main([*args, "--max-voxels", "1000"]) == 2
    err = capsys.readouterr().err
    assert "limit" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "case1").exists()
    assert main([*args, "--max-voxels", "0"]) == 2  # refused where it enters
    assert "max_voxels" in capsys.readouterr().err
    assert main(args) == 0  # the default limit lets a normal CT through
