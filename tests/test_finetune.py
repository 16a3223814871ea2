"""universal.finetune: a short fine-tune on a corrected phantom case learns only the corrected class (zero
gradient on every other class's logits), writes a model with its spec and card, stops cleanly, refuses bad input;
the CLI `finetune`; the write_phantom_dataset label-map fix."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from universal import corrections
from universal import finetune as ft
from universal.cli import main
from universal.data import load_manifest, validate_manifest, write_phantom_dataset
from universal.errors import InputError
from universal.phantom import make_phantom

CLASSES = ["spleen", "right kidney", "left kidney", "liver", "aorta", "liver tumor"]
TINY_BACKBONE = {"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}
QUICK = {
    "steps": 2,
    "patch_size": (16, 16, 16),
    "batch_size": 2,
    "samples_per_case": 1,
    "device": "cpu",
    "lr": 1e-3,
}


class FakeClock:
    def __init__(self, tick: float = 0.5) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from universal.model import create_model, save_checkpoint
    from universal.preprocess import PreprocessConfig
    from universal.spec import InferenceDefaults

    torch.manual_seed(0)
    model = create_model(
        "segresnet",
        classes=CLASSES,
        encoder="onehot",
        preprocessing=PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0)),
        inference=InferenceDefaults(patch_size=(32, 32, 32)),
        **TINY_BACKBONE,
    )
    return save_checkpoint(model, tmp_path_factory.mktemp("w") / "tiny.pt")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One phantom case whose spleen was 'corrected' (the prediction replaced by the true mask)."""
    ph = make_phantom(shape=(48, 48, 36), spacing=(4.0, 4.0, 4.0), seed=1)
    folder = tmp_path_factory.mktemp("corrections")
    corrections.save_case(folder, ph.volume, ph.masks, ["spleen"], name="p1", source="tiny.pt")
    return folder


@pytest.fixture
def recorded(monkeypatch):
    """Every masked loss call of the training loop: its availability and the gradient its logits receive."""
    import universal.loss

    calls: list[dict] = []
    original = universal.loss.masked_bce_dice

    def spy(logits, target, available, **kw):
        call = {"available": available.detach().cpu().clone(), "shape": tuple(logits.shape)}
        logits.register_hook(lambda g: call.__setitem__("grad", g.detach().cpu().clone()))
        calls.append(call)
        return original(logits, target, available, **kw)

    monkeypatch.setattr(universal.loss, "masked_bce_dice", spy)
    return calls


@pytest.mark.slow
def test_finetune_learns_only_the_corrected_class(dataset, weights, tmp_path, recorded):
    from universal.model import load_checkpoint, load_pretrained

    steps = []
    result = ft.finetune(
        dataset,
        weights,
        tmp_path / "mine.pt",
        ft.FinetuneConfig(**QUICK),
        clock=FakeClock(),
        progress=lambda s, n, loss: steps.append((s, n, loss)),
    )
    k = CLASSES.index("spleen")
    assert [s[:2] for s in steps] == [(1, 2), (2, 2)] and len(recorded) == 2
    for (
        call
    ) in recorded:  # the masked loss reads the spleen only; every other class gets exactly zero gradient
        assert call["available"].tolist() == [[c == "spleen" for c in CLASSES]] * 2
        others = torch.ones(len(CLASSES), dtype=torch.bool)
        others[k] = False
        assert torch.count_nonzero(call["grad"][:, others]) == 0
        assert torch.count_nonzero(call["grad"][:, k]) > 0
    assert result.checkpoint == tmp_path / "mine.pt" and result.card == tmp_path / "mine.md"
    assert (result.steps, result.cases, result.classes, result.stopped) == (2, 1, ("spleen",), False)
    new, old = load_checkpoint(result.checkpoint), load_pretrained(weights)
    spec = new.spec
    assert (
        spec.inference == old.spec.inference and spec.preprocessing == old.spec.preprocessing
    )  # the source's
    assert spec.provenance.steps == 2 and spec.provenance.datasets == ("corrections",)
    assert "fine-tuned from tiny.pt on 1 corrected case(s); classes: spleen" in spec.provenance.notes
    assert spec.provenance.train_seconds == pytest.approx(1.0)  # two steps of the fake clock's 0.5 s
    changed = [n for n, p in new.state_dict().items() if not torch.equal(p, old.state_dict()[n])]
    assert changed and "organ_embedding" not in changed
    card = result.card.read_text()
    assert (
        "| corrected cases | 1 |" in card and "| classes fine-tuned | spleen |" in card and "2 of 2" in card
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.md", "mine.pt"]  # no work folder left


@pytest.mark.slow
def test_mixing_the_phantom_adds_fully_annotated_cases(dataset, weights, tmp_path, recorded):
    cfg = ft.FinetuneConfig(**{**QUICK, "steps": 1, "mix_phantom": 1})
    result = ft.finetune(dataset, weights, tmp_path / "mixed.pt", cfg, clock=FakeClock())
    (call,) = recorded
    rows = sorted(call["available"].tolist(), key=sum)
    assert rows[0] == [c == "spleen" for c in CLASSES]  # the corrected case
    assert all(rows[1])  # the phantom case: every class annotated
    from universal.model import load_checkpoint

    provenance = load_checkpoint(result.checkpoint).spec.provenance
    assert (
        provenance.datasets == ("corrections", "phantom") and "1 phantom case(s) mixed in" in provenance.notes
    )


def test_default_patch_is_the_weights_window(dataset, weights, tmp_path, recorded):
    cfg = ft.FinetuneConfig(steps=1, batch_size=1, device="cpu")
    assert cfg.patch_size is None
    result = ft.finetune(dataset, weights, tmp_path / "w.pt", cfg, clock=FakeClock())
    assert recorded[0]["shape"][2:] == (32, 32, 32)  # the tiny weights' inference window
    assert "patch 32×32×32" in result.card.read_text()
    small = ft.finetune(dataset, weights, tmp_path / "s.pt", ft.FinetuneConfig(**{**QUICK, "steps": 1}))
    assert recorded[-1]["shape"][2:] == (16, 16, 16) and small.steps == 1


def test_stop_writes_nothing_and_says_so(dataset, weights, tmp_path):
    stop = threading.Event()
    cfg = ft.FinetuneConfig(**{**QUICK, "steps": 5})
    result = ft.finetune(
        dataset, weights, tmp_path / "m.pt", cfg, clock=FakeClock(), progress=lambda *a: stop.set(), stop=stop
    )
    assert result.stopped and result.steps == 1 and result.checkpoint is None
    assert "nothing was written" in result.message
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked_once_with_every_problem():
    with pytest.raises(InputError) as exc:
        ft.FinetuneConfig(steps=0, patch_size=(16, 16), lr=-1, foreground=2, mix_phantom=-1)
    text = str(exc.value)
    for key in ("steps", "patch_size", "lr", "foreground", "mix_phantom"):
        assert key in text
    assert ft.FinetuneConfig(patch_size=[32, 32, 16]).patch_size == (32, 32, 16)


def test_bad_input_is_one_clear_error(dataset, weights, tmp_path):
    with pytest.raises(InputError, match="no corrections dataset"):
        ft.finetune(tmp_path / "none", weights, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"\.pt file"):
        ft.finetune(dataset, weights, tmp_path / "m.pth")
    ph = make_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=0)
    other = tmp_path / "other"
    corrections.save_case(other, ph.volume, ph.masks, ["stomach"], name="s")
    with pytest.raises(InputError, match="do not segment"):
        ft.finetune(other, weights, tmp_path / "m.pt", ft.FinetuneConfig(**QUICK))
    assert not list(tmp_path.glob("*.pt"))


def test_cli_finetune(dataset, weights, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = [
        "finetune",
        str(dataset),
        "--weights",
        str(weights),
        "-o",
        str(out),
        "--steps",
        "1",
        "--patch",
        "16",
    ]
    assert main([*args, "--device", "cpu"]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "fine-tuned tiny.pt on 1 case(s) (spleen) for 1 steps" in capsys.readouterr().out
    assert main(["finetune", str(dataset), "-o", str(tmp_path / "x.pt"), "--steps", "0"]) == 2
    assert "steps is 0" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.pt")]) == 2


def test_phantom_dataset_label_map_covers_every_case(tmp_path):
    """write_phantom_dataset with None took the label map from the first case only: seed 2 draws 25 classes,
    seed 3 draws 26, so case 2's extra class had no label value in the manifest."""
    first = set(make_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=2).classes)
    second = set(make_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0), seed=3).classes)
    assert second - first  # the situation the bug needs
    path = write_phantom_dataset(tmp_path, 2, (32, 32, 24), (6.0, 6.0, 6.0), {"all": None}, seed=2)
    manifest = load_manifest(path)
    assert set(manifest.datasets["all"].annotated) == first | second
    assert validate_manifest(manifest, read_labels=True, strict=False) == []
    assert np.all([c.availability(sorted(first | second)).all() for c in manifest.cases])


@pytest.mark.slow
def test_anchor_trains_on_the_pseudo_labelled_manifest(dataset, weights, tmp_path, recorded, monkeypatch):
    """anchor=True: the corrected cases go through pseudo_label (the corrected class keeps its label, the others
    get the source model's confident predictions) and training reads that manifest's availability."""
    import universal.pseudo

    made = []
    original = universal.pseudo.pseudo_label

    def spy(manifest, teacher, out, config=None, **kw):
        path, report = original(manifest, teacher, out, config, **kw)
        made.append(load_manifest(path))  # read now: the work folder is removed after training
        return path, report

    monkeypatch.setattr(universal.pseudo, "pseudo_label", spy)
    cfg = ft.FinetuneConfig(**{**QUICK, "steps": 1, "batch_size": 1, "anchor": True})
    result = ft.finetune(dataset, weights, tmp_path / "anchored.pt", cfg, clock=FakeClock())
    ((case,),) = [m.cases for m in made]
    assert "spleen" in case.annotated_classes() and "spleen" not in case.pseudo  # the correction stays itself
    (call,) = recorded
    assert call["available"].tolist() == [case.availability(CLASSES).tolist()]
    assert "| other classes anchored on the source's predictions | yes |" in result.card.read_text()
    assert not (tmp_path / "anchor").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "anchored.md",
        "anchored.pt",
    ]
