"""universal.train: config, masked back-propagation, a short run, exact resume, DDP on 2 CPU processes."""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from universal.data import PatchDataset, load_manifest, prepare_case, write_phantom_dataset
from universal.errors import InputError
from universal.train import (
    DataSection,
    OptimSection,
    TrainConfig,
    config_doc,
    load_config,
    lr_factor,
    resolve_config,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["spleen", "right kidney", "left kidney", "liver", "liver tumor", "lung tumor"]
LABEL_SETS = {
    "organs": ["liver", "spleen", "right kidney", "left kidney"],
    "liver_tumour": ["liver", "liver tumor"],
    "lung_tumour": ["lung tumor"],
}
TINY_BACKBONE = {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, (48, 48, 40), (3.0, 3.0, 3.0), LABEL_SETS)


class FakeClock:
    """A clock that advances ``tick`` seconds per reading, however fast or loaded the machine is."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def tiny_config(manifest: Path, out_dir: Path, **train_overrides) -> dict:
    return {
        "model": {"classes": CLASSES, "encoder": "onehot", "kwargs": dict(TINY_BACKBONE)},
        "data": {"train": str(manifest), "spacing_mm": 3.0, "patch_size": 16, "samples_per_case": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {
            "steps": 4,
            "batch_size": 2,
            "out_dir": str(out_dir),
            "ckpt_every": 0,
            "progress": False,
            "resume": "auto",
            **train_overrides,
        },
    }


# ---------------------------------------------------------------------------------------------------- config
def test_config_errors_are_listed():
    with pytest.raises(InputError) as err:
        resolve_config(
            {"model": {"backbon": "x"}, "optim": {"name": "sgd"}, "train": {"steps": 0}, "extra": {}}
        )
    text = str(err.value)
    for needle in (
        "unknown key model.backbon (valid: backbone, classes,",
        "data.train is required",
        "optim.name is 'sgd'; it must be one of adamw, novograd",
        "train.steps is 0; it must be an integer >= 1",
        "unknown section 'extra'",
    ):
        assert needle in text
    assert text.startswith("training config has 5 problems:")
    # values become their declared types; every other key takes the schema's default
    cfg = resolve_config({"data": {"train": "x.json", "patch_size": 32, "spacing_mm": 2}})
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.patch_size == (32, 32, 32) and cfg.data.spacing_mm == (2.0, 2.0, 2.0)
    assert cfg.data.train == ("x.json",) and cfg.optim == OptimSection()
    assert cfg.data == DataSection(train="x.json", patch_size=[32] * 3, spacing_mm=2.0)
    # one schema both ways: the plain form (config.json) resolves to the same config; a TrainConfig passes through
    assert resolve_config(json.loads(json.dumps(cfg.to_dict()))) == cfg and resolve_config(cfg) is cfg
    with pytest.raises(InputError, match="data.train is required"):
        TrainConfig()
    with pytest.raises(InputError, match="optim.lr is -1; it must be a number > 0"):
        OptimSection(lr=-1)


@pytest.mark.parametrize(
    ("key", "yaml_value", "message"),
    [
        ("optim.lr", "-1e-3", "optim.lr is -0.001; it must be a number > 0"),
        ("train.steps", "ten", "train.steps is 'ten'; it must be an integer >= 1"),
        ("data.patch_size", "big", "data.patch_size is 'big'; it must be one positive integer or three"),
        ("data.crop_foreground", "maybe", "data.crop_foreground is 'maybe'; it must be true or false"),
        ("train.time_budget_s", "0", "train.time_budget_s is 0; it must be a number > 0, or null"),
        ("optim.betas", "[0.9]", "optim.betas is [0.9]; it must be two numbers in [0, 1)"),
    ],
)
def test_wrong_values_are_refused_before_any_work(tmp_path, key, yaml_value, message):
    run = tmp_path / "run"
    sections = {"data": {"train": "m.json"}, "train": {"out_dir": str(run)}}
    section, name = key.split(".")
    sections.setdefault(section, {})[name] = yaml_value  # as written in the file
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in kv.items()) for s, kv in sections.items())
    )
    with pytest.raises(InputError) as err:
        train(path)
    assert str(err.value) == f"training config: {message}"  # one line: the key, the value, what is allowed
    assert not run.exists()  # refused before any work


def test_config_doc_is_generated_from_the_schema():
    doc = config_doc()
    committed = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert committed == doc, "docs/CONFIG.md is stale: python -m universal.train --doc > docs/CONFIG.md"
    for name, section in TrainConfig.__dataclass_fields__.items():
        for key in section.default_factory.__dataclass_fields__:
            assert f"| `{name}.{key}` |" in doc
    assert "| `optim.lr` | `0.0001` | a number > 0 |" in doc and "| `data.train` | required |" in doc


def test_cli_set_is_checked_by_the_schema(tmp_path, capsys):
    from universal.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: m.json}}\ntrain: {{out_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(cfg), "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err == "error: training config: optim.lr is -1; it must be a number > 0\n"
    assert main(["train", str(cfg), "--set", "optim.lr=-1e-3"]) == 2  # YAML as in config files: a number
    assert "optim.lr is -0.001; it must be a number > 0" in capsys.readouterr().err
    assert main(["train", str(cfg), "--steps", "0", "--set", "data.patch_size=big"]) == 2
    err = capsys.readouterr().err
    assert "train.steps is 0" in err and "data.patch_size is 'big'" in err
    assert not (tmp_path / "run").exists()


def test_doctests():
    import doctest

    import universal.train

    assert doctest.testmod(universal.train, optionflags=doctest.ELLIPSIS).failed == 0


def test_load_config_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  train: m/train.json\ntrain:\n  out_dir: run\n  resume: auto\n")
    (tmp_path / "b.toml").write_text('[data]\ntrain = "m/train.json"\n[train]\nout_dir = "/abs/run"\n')
    a, b = load_config(tmp_path / "a.yaml"), load_config(tmp_path / "b.toml")
    assert a["data"]["train"] == str((tmp_path / "m/train.json").resolve())
    assert a["train"]["out_dir"] == str((tmp_path / "run").resolve()) and a["train"]["resume"] == "auto"
    assert b["data"]["train"] == a["data"]["train"] and b["train"]["out_dir"] == "/abs/run"
    (tmp_path / "c.yaml").write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="cannot be parsed"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["example_phantom.yaml", "builtin.yaml", "builtin_round2.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = resolve_config(ROOT / "configs" / name)
    assert all(Path(p).is_absolute() and p.endswith("manifest.json") for p in cfg.data.train)
    assert Path(cfg.train.out_dir).is_absolute() and cfg.optim.lr > 0


def test_warmup_cosine_schedule():
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # monotone decay after warm-up
    assert lr_factor(9, 10, 2, min_ratio=0.1) > 0.1


# ------------------------------------------------------------------------------------------- masked gradients
def test_unavailable_classes_get_no_gradient(manifest):
    from universal.loss import masked_bce_dice
    from universal.model import create_model

    m = load_manifest(manifest)
    prepared = [prepare_case(c, CLASSES, spacing=3.0) for c in m.cases]
    ds = PatchDataset(prepared, (16, 16, 16), CLASSES, samples_per_case=1)
    batch = [ds[i] for i in range(3)]  # one patch of each dataset
    x = torch.stack([b["image"] for b in batch])
    target = torch.stack([b["target"] for b in batch]).float()
    avail = torch.stack([b["available"] for b in batch])
    k = CLASSES.index("lung tumor")
    avail[:, k] = False  # class k is available in no case

    torch.manual_seed(0)
    model = create_model(
        "segresnet", classes=CLASSES, encoder="onehot", embed_dim=len(CLASSES), **TINY_BACKBONE
    )

    def grads(tgt):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.retain_grad()
        masked_bce_dice(logits, tgt, avail).backward()
        return logits.grad.clone(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    g_logits, g_params = grads(target)
    assert torch.count_nonzero(g_logits[:, k]) == 0  # exactly zero, not merely small
    unavailable = ~avail
    assert torch.count_nonzero(g_logits[unavailable]) == 0
    assert torch.count_nonzero(g_logits[avail]) > 0
    # at the model level: what an unavailable class's target says changes no parameter gradient
    garbage = target.clone()
    garbage[unavailable] = 1.0 - garbage[unavailable]
    g_logits2, g_params2 = grads(garbage)
    assert torch.equal(g_logits, g_logits2)
    assert g_params.keys() == g_params2.keys()
    assert all(torch.equal(g_params[n], g_params2[n]) for n in g_params)
    # no parameter is specific to one class (the prompt embeddings are a buffer, not trained)
    assert "organ_embedding" in dict(model.named_buffers())


# ------------------------------------------------------------------------------------------------ short runs
def test_short_run_lowers_the_loss(manifest, tmp_path):
    from universal.data import write_manifest
    from universal.loss import masked_bce_dice
    from universal.model import load_checkpoint

    cfg = tiny_config(manifest, tmp_path / "run", steps=12, val_every=6)
    cfg["data"]["val"] = str(write_manifest(load_manifest(manifest).cases[:1], tmp_path / "val.json"))
    result = train(cfg)
    assert result.step == 12 and result.checkpoint == tmp_path / "run" / "model.pt"

    # loss on fixed patches: the initial weights (same seed) vs the trained ones
    m = load_manifest(manifest)
    prepared = [prepare_case(c, CLASSES, spacing=3.0) for c in m.cases]
    ds = PatchDataset(prepared, (16, 16, 16), CLASSES, samples_per_case=1, pos_neg_ratio=(1, 0), seed=99)
    items = [ds[i] for i in range(6)]
    x = torch.stack([b["image"] for b in items])
    y = torch.stack([b["target"] for b in items]).float()
    a = torch.stack([b["available"] for b in items])
    from universal.train import _build_model

    torch.manual_seed(0)
    initial = _build_model(resolve_config(cfg)).eval()
    trained = load_checkpoint(result.checkpoint).eval()
    with torch.no_grad():
        before, after = masked_bce_dice(initial(x), y, a).item(), masked_bce_dice(trained(x), y, a).item()
    assert after < before - 0.05, (before, after)

    # the checkpoint's spec carries everything segment needs, and how the weights were made
    spec = trained.spec
    assert list(spec.classes) == CLASSES and spec.encoder.startswith("onehot")
    assert spec.preprocessing.target_spacing() == (3.0, 3.0, 3.0) and spec.preprocessing.hu_window == (
        -175.0,
        250.0,
    )
    assert spec.preprocessing.crop_foreground is True and spec.inference.patch_size == (16, 16, 16)
    p = spec.provenance
    assert p.source == "trained" and p.steps == 12 and p.seed == 0 and p.time_budget_s is None
    assert p.datasets == tuple(LABEL_SETS) and p.train_seconds > 0
    assert trained.checkpoint_extra["training"]["patch_size"] == [16, 16, 16]
    # logs: one row per step, validation DSC per class
    rows = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    val = list(csv.DictReader(open(tmp_path / "run" / "val_log.csv")))
    assert [int(r["step"]) for r in val] == [6, 12] and set(CLASSES) <= set(val[0])
    assert len(result.validation) == 2 and set(result.validation[-1]["dsc"]) == set(CLASSES)
    saved_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved_cfg == resolve_config(cfg).to_dict() and saved_cfg["train"]["steps"] == 12


def test_crop_foreground_false_is_recorded_in_the_model(manifest, tmp_path):
    from universal.model import load_checkpoint

    cfg = tiny_config(manifest, tmp_path / "nocrop", steps=1)
    cfg["data"]["crop_foreground"] = False
    result = train(cfg)
    spec = load_checkpoint(result.checkpoint).spec
    assert spec.preprocessing.crop_foreground is False  # inference reads the crop from here
    assert spec == result.model.spec


def test_resume_equals_uninterrupted(manifest, tmp_path):
    straight = train(tiny_config(manifest, tmp_path / "a", steps=4))
    cfg_b = tiny_config(manifest, tmp_path / "b", steps=4)
    half = train(cfg_b, stop_after=2)
    assert half.step == 2 and half.checkpoint == tmp_path / "b" / "checkpoints" / "last.pt"
    resumed = train(cfg_b)
    assert resumed.resumed_from == 2 and resumed.step == 4
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= 1e-6, worst
    la = [h["loss"] for h in straight.history]
    lb = [h["loss"] for h in half.history] + [h["loss"] for h in resumed.history]
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "b" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # the learning rate is placed from the schedule: the state holds its position, no scheduler state
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["schedule_position"] == 4 and "scheduler" not in state
    # resuming a finished run does nothing more; resume=false starts over
    again = train(cfg_b)
    assert again.step == 4 and again.resumed_from == 4 and again.history == []


def test_resume_from_an_older_state_file_with_scheduler_state(manifest, tmp_path):
    """State files of earlier versions keep the position as LambdaLR's last_epoch (and no schedule_position)."""
    cfg = tiny_config(manifest, tmp_path / "old", steps=3)
    cfg["optim"]["warmup_steps"] = 0
    half = train(cfg, stop_after=1)
    path = tmp_path / "old" / "checkpoints" / "last.state.pt"
    state = torch.load(path, weights_only=True)
    state["scheduler"] = {"last_epoch": state.pop("schedule_position"), "base_lrs": [3e-3], "_step_count": 2}
    torch.save(state, path)
    resumed = train(cfg)
    lrs = [h["lr"] for h in half.history + resumed.history]
    np.testing.assert_allclose(lrs, [3e-3 * lr_factor(s, 3, 0) for s in range(3)], rtol=1e-12)


def test_time_budget_ends_the_run_and_drives_the_schedule(manifest, tmp_path):
    from universal.model import load_checkpoint

    cfg = tiny_config(manifest, tmp_path / "t", steps=100_000, time_budget_s=2.0)
    cfg["optim"] = {"lr": 1e-3, "warmup_steps": 0, "min_lr_ratio": 0.0}
    # a fake clock: read once before the loop and once per step, 0.25 s each, so step k ends at 0.25 k s of the
    # 2 s budget whatever the machine's speed: 8 steps, the schedule at 12 500 k of 100 000 steps after step k
    result = train(cfg, clock=FakeClock(0.25))
    assert result.step == 8 and result.checkpoint == tmp_path / "t" / "model.pt"
    saved = load_checkpoint(result.checkpoint)
    info = saved.checkpoint_extra["training"]
    assert info["step"] == 8 and info["time_budget_s"] == 2.0 and info["train_seconds"] == 2.0
    p = saved.spec.provenance
    assert (p.steps, p.train_seconds, p.time_budget_s) == (8, 2.0, 2.0)
    # the cosine schedule followed the clock: by the last step the learning rate had decayed to near zero,
    # although step / steps is still tiny (a step-driven schedule would still be at the full 1e-3)
    lrs = [h["lr"] for h in result.history]
    assert lrs == pytest.approx([1e-3 * lr_factor(12_500 * k, 100_000, 0) for k in range(8)], rel=1e-12)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < 0.05e-3
    rows = list(csv.DictReader(open(tmp_path / "t" / "train_log.csv")))
    assert [float(r["seconds"]) for r in rows] == [0.25] * 8
    # resuming a run whose budget is spent trains nothing more
    again = train(cfg, clock=FakeClock(0.25))
    assert again.step == 8 and again.history == []
    with pytest.raises(InputError, match="time_budget_s"):
        resolve_config({"data": {"train": "x.json"}, "train": {"time_budget_s": -1}})


def test_adamw_and_novograd_and_synthesis_hook(manifest, tmp_path):
    cfg = tiny_config(manifest, tmp_path / "n", steps=1, num_workers=1)  # also the DataLoader worker path
    cfg["optim"]["name"] = "novograd"
    cfg["synthesis"] = {"hook": f"{__name__}:_brighten", "prob": 1.0, "kwargs": {"amount": 0.0}}
    result = train(cfg)
    assert result.step == 1 and np.isfinite(result.history[0]["loss"])
    bad = copy.deepcopy(cfg)
    bad["synthesis"]["hook"] = "no_such_module:fn"
    bad["train"]["resume"] = False  # a resume with another hook is refused before the hook is imported
    with pytest.raises(InputError, match="cannot be imported"):
        train(bad)


def _brighten(image, target, available, *, classes, rng, amount):
    return image + amount, target, available


# -------------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_hold_identical_weights(manifest, tmp_path):
    cfg = tiny_config(manifest, tmp_path / "ddp", steps=2, resume=False)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, torch
        from universal.train import train
        cfg = json.load(open({str(cfg_path)!r}))
        result = train(cfg)
        rank = int(os.environ["RANK"])
        torch.save(result.model.state_dict(), os.path.join({str(tmp_path)!r}, f"rank{{rank}}.pt"))
        json.dump([h["loss"] for h in result.history], open(os.path.join({str(tmp_path)!r}, f"loss{{rank}}.json"), "w"))
    """)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    # the weights moved, and only rank 0 logged
    torch.manual_seed(0)
    from universal.train import _build_model

    init = _build_model(resolve_config(cfg)).state_dict()
    assert any(not torch.equal(init[k], s0[k]) for k in s0 if s0[k].is_floating_point())
    assert (
        len(json.load(open(tmp_path / "loss0.json"))) == 2 and json.load(open(tmp_path / "loss1.json")) == []
    )
    assert (tmp_path / "ddp" / "model.pt").is_file()
