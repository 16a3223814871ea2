"""Tests of universal.model: backbones, the Universal Model's heads, checkpoints (own format and official layout).

Every test that takes the ``case`` fixture runs for every registered backbone (``list_models()``). Inputs are tiny
(Swin UNETR needs 64 voxels along one axis); models are built once per module.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from universal.errors import (
    CheckpointError,
    ClassNameError,
    DownloadError,
    EncoderUnavailableError,
    InputError,
)
from universal.model import (
    PRETRAINED,
    UniversalModel,
    create_model,
    dynamic_heads,
    list_models,
    load_checkpoint,
    load_official,
    load_pretrained,
    save_checkpoint,
)
from universal.model import checkpoints as ckpt_module
from universal.model.backbones import (
    MERGING_ORDER_V09,
    PatchMergingV09,
    PerSampleBatchNorm3d,
    _merge_subgrids,
    build_backbone,
)

CLASSES = ["liver", "spleen", "kidney tumor", "liver tumor", "aorta"]
EMBED_DIM = 32
OFFICIAL = {
    "unet": "official_universal_unet_state_dict.json",
    "swinunetr": "official_universal_swinunetr_state_dict.json",
}

torch.set_num_threads(2)


def _patch_shape(model: UniversalModel) -> tuple[int, int, int]:
    d = model.size_divisor
    return (max(16, 2 * d), max(16, d), max(16, d))


def _embeddings(k: int, d: int = EMBED_DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


class Case:
    """A model of one backbone (eval mode), an input patch and the model's full output on it."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = create_model(
            name, classes=CLASSES, encoder="onehot", embeddings=_embeddings(len(CLASSES))
        ).eval()
        self.x = torch.rand(1, 1, *_patch_shape(self.model), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.out = self.model(self.x)


@pytest.fixture(scope="module", params=list_models())
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_three_backbones() -> None:
    assert {"segresnet", "unet", "swinunetr"} <= set(list_models())
    with pytest.raises(InputError, match="segresnet"):
        create_model("resnet-9000", classes=["liver"], embeddings=_embeddings(1))


# ----------------------------------------------------------------------------------------------------- forward


def test_forward_shape(case: Case) -> None:
    assert case.out.shape == (1, len(CLASSES), *case.x.shape[2:])
    assert torch.isfinite(case.out).all()
    assert case.model.class_names == CLASSES


def test_class_subset_equals_channels_of_full_output(case: Case) -> None:
    with torch.no_grad():
        sub = case.model(case.x, classes=["Liver Tumor", "spleen"])
    torch.testing.assert_close(sub, case.out[:, [3, 1]], atol=1e-5, rtol=1e-5)


def test_backward_reaches_backbone_and_controller(case: Case) -> None:
    model = case.model
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        batch = 1 if case.name == "swinunetr" else 2
        x = torch.rand(batch, 1, *case.x.shape[2:])
        out = model(x, classes=["liver", "aorta"])
        out.square().mean().backward()
        first_backbone_param = next(p for p in model.backbone.parameters())
        for name, param in [
            ("backbone", first_backbone_param),
            ("controller", model.controller.weight),
            ("text_to_vision", model.text_to_vision.weight),
            ("GAP", model.GAP[3].weight),
            ("precls_conv", model.precls_conv[2].weight),
        ]:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
        assert model.organ_embedding.grad is None  # a buffer, not trained
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_forward_rejects_bad_inputs(case: Case) -> None:
    with pytest.raises(InputError, match="B, 1"):
        case.model(torch.zeros(1, 2, *case.x.shape[2:]))
    d = case.model.size_divisor
    with pytest.raises(InputError, match="multiple"):
        case.model(torch.zeros(1, 1, d + 1, d, d))
    with pytest.raises(ClassNameError, match="does not predict"):
        case.model(case.x, classes=["pancreas"])
    with pytest.raises(ClassNameError):
        case.model(case.x, classes=["not an organ"])


def test_config_is_plain(case: Case) -> None:
    config = case.model.config()
    assert json.loads(json.dumps(config)) == config
    assert config["backbone"] == case.name and config["classes"] == CLASSES
    assert config["encoder"] == "onehot" and config["embed_dim"] == EMBED_DIM
    assert config["preprocessing"]["spacing_mm"] == 1.5


# ----------------------------------------------------------------------------------------------------- heads


def _loop_heads(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Straightforward reference: a Python loop over batch items and classes with F.conv3d per layer."""
    out = torch.empty(params.shape[0], params.shape[1], *features.shape[2:])
    for b in range(params.shape[0]):
        for k in range(params.shape[1]):
            p = params[b, k]
            w1, w2, w3 = (
                p[0:64].view(8, 8, 1, 1, 1),
                p[64:128].view(8, 8, 1, 1, 1),
                p[128:136].view(1, 8, 1, 1, 1),
            )
            b1, b2, b3 = p[136:144], p[144:152], p[152:153]
            h = F.relu(F.conv3d(features[b : b + 1], w1, b1))
            h = F.relu(F.conv3d(h, w2, b2))
            out[b, k] = F.conv3d(h, w3, b3)[0, 0]
    return out


def test_vectorised_heads_equal_per_class_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 5, 6, 7, generator=gen)
    params = torch.randn(2, 4, 153, generator=gen)
    expected = _loop_heads(features, params)
    torch.testing.assert_close(dynamic_heads(features, params), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dynamic_heads(features, params, chunk_size=3), expected, atol=1e-5, rtol=1e-5)


def test_controller_equals_conv_on_image_then_text_concatenation() -> None:
    model = create_model("segresnet", classes=CLASSES, encoder="onehot", embeddings=_embeddings(len(CLASSES)))
    gen = torch.Generator().manual_seed(2)
    global_feature = torch.randn(2, 256, generator=gen)
    with torch.no_grad():
        params = model.controller_params(global_feature, [4, 0])
        text = F.relu(model.text_to_vision(model.organ_embedding))
        for b in range(2):
            for j, k in enumerate([4, 0]):
                cond = torch.cat([global_feature[b], text[k]]).view(1, 512, 1, 1, 1)  # image feature first
                expected = model.controller(cond).flatten()
                torch.testing.assert_close(params[b, j], expected, atol=1e-5, rtol=1e-5)


def test_whole_model_heads_equal_loop_reference() -> None:
    model = create_model(
        "segresnet", classes=CLASSES, encoder="onehot", embeddings=_embeddings(len(CLASSES))
    ).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        bottleneck, decoded = model.backbone(x)
        g = model.GAP(bottleneck).flatten(1)
        feats = model.precls_conv(decoded)
        params = model.controller_params(g)
        expected = _loop_heads(feats, params)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        model.head_chunk_size = 2
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- backbones


def test_segresnet_parameter_count() -> None:
    for dim in (32, 512):
        model = create_model("segresnet", classes=None, encoder="onehot", embed_dim=dim)
        count = sum(p.numel() for p in model.parameters())
        assert 4.5e6 <= count <= 5.0e6, count
    backbone = build_backbone("segresnet")
    assert backbone.bottleneck_channels == 128 and backbone.decoder_channels == 16
    bott, dec = backbone(torch.rand(1, 1, 16, 16, 16))
    assert bott.shape == (1, 128, 2, 2, 2) and dec.shape == (1, 16, 16, 16, 16)


def test_segresnet_widths_groupnorm_cannot_split_are_a_clear_error() -> None:
    for filters in (8, 12, 24):
        with pytest.raises(InputError, match="multiple of 16"):
            create_model("segresnet", classes=["liver"], encoder="onehot", init_filters=filters)
    model = create_model("segresnet", classes=["liver"], encoder="onehot", init_filters=32)
    assert model(torch.rand(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_per_sample_batchnorm_matches_official_batch_of_one() -> None:
    bn = PerSampleBatchNorm3d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    reference = torch.nn.BatchNorm3d(3).train()  # the official: always the current batch's statistics
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(3, 3, 4, 5, 6) * 4 + 2
    out = bn(x)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], reference(x[i : i + 1]), atol=1e-5, rtol=1e-5)
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(dict(bn.named_buffers()))
    bn.train()
    bn(x)
    assert int(bn.num_batches_tracked) == 1 and not torch.allclose(bn.running_mean, torch.zeros(3))


def test_unet_batched_windows_equal_single_windows() -> None:
    model = create_model(
        "unet", classes=CLASSES, encoder="onehot", embeddings=_embeddings(len(CLASSES))
    ).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    x[1] = x[1] * 3 + 1  # very different intensity statistics in the second window
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_merge_subgrids_follows_documented_monai09_order() -> None:
    x = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2, 1)  # value = 4 d + 2 h + w
    merged = _merge_subgrids(x, MERGING_ORDER_V09)
    # (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1)
    assert merged.flatten().tolist() == [0, 4, 2, 1, 5, 2, 1, 7]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 4, 3, generator=gen)
    expected = torch.empty(2, 2, 3, 2, 8 * 3)
    offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    for i in range(2):
        for j in range(3):
            for k in range(2):
                expected[:, i, j, k] = torch.cat(
                    [x[:, 2 * i + a, 2 * j + b, 2 * k + c] for a, b, c in offsets], -1
                )
    torch.testing.assert_close(_merge_subgrids(x, MERGING_ORDER_V09), expected)

    pm = PatchMergingV09(dim=3)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(expected)))


def test_patch_merging_v09_differs_from_monai_corrected_order() -> None:
    from monai.networks.nets.swin_unetr import PatchMerging

    old, new = PatchMergingV09(dim=4), PatchMerging(dim=4)
    new.load_state_dict(old.state_dict())  # same parameter names and shapes
    x = torch.randn(1, 4, 4, 4, 4)
    assert not torch.allclose(old(x), new(x), atol=1e-4)


def test_swin_official_merging_changes_hidden_states_from_second_stage() -> None:
    torch.manual_seed(0)
    official = build_backbone("swinunetr").eval()
    corrected = build_backbone("swinunetr", merging="corrected").eval()
    corrected.load_state_dict(official.state_dict())
    x = torch.rand(1, 1, 64, 32, 32)
    with torch.no_grad():
        h_official = official.swinViT(x, True)
        h_corrected = corrected.swinViT(x, True)
    torch.testing.assert_close(h_official[0], h_corrected[0])  # before any merging: identical
    assert not torch.allclose(h_official[1], h_corrected[1], atol=1e-4)  # after the first merging: different


# ----------------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(case: Case, tmp_path) -> None:
    path = save_checkpoint(case.model, tmp_path / "sub" / "model.pt", extra={"epoch": 3, "dice": [0.5, 0.9]})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "universal-checkpoint" and raw["version"] == 2
    assert raw["spec"] == case.model.spec.to_dict() and raw["extra"] == {"epoch": 3, "dice": [0.5, 0.9]}
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary file

    loaded = load_checkpoint(path)
    assert loaded.class_names == CLASSES and loaded.encoder_name == "onehot"
    assert loaded.template == case.model.template and loaded.checkpoint_extra["epoch"] == 3
    torch.testing.assert_close(loaded.organ_embedding, case.model.organ_embedding, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(case.x), case.out, atol=1e-6, rtol=0)


def test_load_pretrained_detects_universal_format(tmp_path) -> None:
    model = create_model("segresnet", classes=["liver", "IVC"], encoder="onehot", embeddings=_embeddings(2))
    path = save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_pretrained(str(path))
    assert loaded.class_names == ["liver", "inferior vena cava"] and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_save_checkpoint_rejects_non_plain_extra(tmp_path) -> None:
    model = create_model("segresnet", classes=["liver"], encoder="onehot", embeddings=_embeddings(1))
    with pytest.raises(CheckpointError, match="extra"):
        save_checkpoint(model, tmp_path / "m.pt", extra={"bad": object()})
    assert not (tmp_path / "m.pt").exists()


def _official_state(name: str, shared_reference, seed: int = 0) -> dict[str, torch.Tensor]:
    manifest = json.loads((shared_reference / OFFICIAL[name]).read_text())
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in manifest.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("relative_position_index"):
            state[key] = torch.randint(0, 2197, shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_state_dict_matches_official_manifest(name: str, shared_reference) -> None:
    manifest = json.loads((shared_reference / OFFICIAL[name]).read_text())
    model = create_model(name, classes=None, encoder="onehot", embeddings=np.zeros((32, 512), np.float32))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(manifest), (sorted(set(ours) - set(manifest)), sorted(set(manifest) - set(ours)))
    assert ours == manifest


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_load_official_layout(name: str, shared_reference, tmp_path) -> None:
    state = _official_state(name, shared_reference)
    path = tmp_path / f"{name}.pth"
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, path)

    if name == "swinunetr":  # the official loaders also accept Swin keys without 'backbone.'
        variants = [path, {k.removeprefix("backbone."): v for k, v in state.items()}]
    else:  # a bare state dict with 'module.' prefixes
        variants = [path, {f"module.{k}": v for k, v in state.items()}]
    for source in variants:
        model = load_official(source)
        assert model.backbone_name == name and not model.training
        assert len(model.class_names) == 32 and model.class_names[0] == "spleen"
        assert model.encoder_name == "table:official-clip"
        assert model.template == "A computerized tomography of a {}"
        # the official pipeline's settings come with the weights: 1.5 mm, 96³ windows, overlap 0.5
        assert model.spec.provenance.source == "official" and model.spec.inference.overlap == 0.5
        assert model.spec.preprocessing.target_spacing() == (1.5, 1.5, 1.5)
        assert model.spec.inference.patch_size == (96, 96, 96) and model.spec.classes == tuple(
            model.class_names
        )
        loaded = model.state_dict()
        for key, value in state.items():
            assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
        del model, loaded

    if name == "unet":  # (the same code path for both backbones; the Swin UNETR is slow to build)
        detected = load_pretrained(path)  # format and backbone detected
        assert detected.backbone_name == name


def test_official_checkpoint_of_another_class_count_is_refused(shared_reference, tmp_path) -> None:
    state = _official_state("unet", shared_reference)
    state["organ_embedding"] = torch.randn(14, 512)
    path = tmp_path / "foreign.pth"
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(
        CheckpointError, match=r"organ_embedding: checkpoint \(14, 512\) vs model \(32, 512\)"
    ):
        load_official(path)
    with pytest.raises(CheckpointError, match="load_official"):
        load_checkpoint(path)  # our loader points to the right function


def test_official_checkpoint_into_wrong_backbone_lists_keys(shared_reference) -> None:
    state = _official_state("unet", shared_reference)
    state.pop("GAP.3.bias")
    state["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_official(state)
    message = str(info.value)
    assert "missing (1)" in message and "GAP.3.bias" in message
    assert "unexpected (1)" in message and "backbone.extra.weight" in message


def test_universal_checkpoint_with_mismatched_weights(tmp_path) -> None:
    model = create_model(
        "segresnet", classes=["liver", "spleen"], encoder="onehot", embeddings=_embeddings(2)
    )
    path = save_checkpoint(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["organ_embedding"] = torch.zeros(2, 64)  # wrong width
    payload["spec"]["backbone"] = "unet"  # another architecture
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(info.value)
    assert "organ_embedding: checkpoint (2, 64) vs model (2, 32)" in message
    assert "backbone.down_tr64.ops.0.conv1.weight" in message  # missing
    assert "backbone.convInit.conv.weight" in message  # unexpected


def test_wrong_embedding_width_or_count() -> None:
    with pytest.raises(InputError, match="K=2"):
        create_model("segresnet", classes=["liver", "spleen"], embeddings=_embeddings(3))
    with pytest.raises(InputError, match="embed_dim"):
        create_model("segresnet", classes=["liver", "spleen"], embeddings=_embeddings(2), embed_dim=64)
    with pytest.raises(ClassNameError):
        create_model("segresnet", classes=["liverr"], embeddings=_embeddings(1))


def test_set_prompts() -> None:
    model = create_model(
        "segresnet", classes=["liver", "spleen"], encoder="onehot", embeddings=_embeddings(2)
    )
    model.set_prompts(template="photo")  # the recorded encoder ("onehot") re-encodes
    assert model.template == "A photo of a {}"
    expected = np.zeros((2, 32), np.float32)
    expected[0, 5] = expected[1, 0] = 1.0  # liver is class 6, spleen class 1
    np.testing.assert_array_equal(model.organ_embedding.numpy(), expected)
    with pytest.raises(InputError, match="384"):
        model.set_prompts(encoder="minilm")  # 384-d embeddings for a 32-d model
    official = create_model(
        "segresnet", classes=["liver"], encoder="table:official-clip", embeddings=_embeddings(1, 512)
    )
    with pytest.raises(EncoderUnavailableError, match="Pass encoder="):
        official.set_prompts(template="photo")  # the recorded name cannot be rebuilt


class Exploit:
    """A pickled object whose unpickling would run code: loaders must refuse it, never call it."""

    ran = False

    def __reduce__(self):
        return (_mark_exploited, ())


def _mark_exploited() -> None:
    Exploit.ran = True


@pytest.mark.parametrize("kind", ["random", "text", "torch-object", "plain-pickle", "empty"])
def test_non_checkpoint_files_are_refused(kind: str, tmp_path) -> None:
    path = tmp_path / ("notes.txt" if kind == "text" else "weights.pt")
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "torch-object":
        torch.save({"net": Exploit()}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"net": Exploit()}))
    else:
        path.write_bytes(b"")
    for loader in (load_checkpoint, load_official, load_pretrained):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        message = str(info.value)
        if kind in ("torch-object", "plain-pickle"):
            assert "Python objects" in message
        else:
            assert "not a" in message
    assert not Exploit.ran


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_checkpoint("/nonexistent/model.pt")
    with pytest.raises(CheckpointError, match="universal-unet"):
        load_pretrained("no-such-weights")


def test_registry_entries() -> None:
    for name in ("universal-unet", "universal-swinunetr", "builtin"):
        entry = PRETRAINED[name]
        assert {"url", "sha256", "licence", "backbone", "description"} <= set(entry)
    assert PRETRAINED["universal-unet"]["licence"] == "CC BY-NC-ND 4.0 (research only)"
    assert PRETRAINED["universal-swinunetr"]["backbone"] == "swinunetr"


def test_builtin_weights_missing_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(ckpt_module, "builtin_weights_path", lambda: tmp_path / "builtin.pt")
    with pytest.raises(CheckpointError, match="not shipped yet"):
        load_pretrained("builtin")


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_download_offline_says_how_to_download_by_hand(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DownloadError) as info:
        load_pretrained("universal-unet", accept_licence=True)
    message = str(info.value)
    assert PRETRAINED["universal-unet"]["url"] in message and "pass its path" in message
    assert not list((tmp_path / "weights").glob("*"))  # nothing half-written


def test_download_checks_sha256_and_caches(monkeypatch, tmp_path) -> None:
    import hashlib

    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(tmp_path))
    model = create_model("segresnet", classes=["liver"], encoder="onehot", embeddings=_embeddings(1))
    blob = io.BytesIO()
    torch.save(
        {
            "format": "universal-checkpoint",
            "version": 2,
            "spec": model.spec.to_dict(),
            "state_dict": model.state_dict(),
            "extra": {},
        },
        blob,
    )
    data = blob.getvalue()
    calls = []

    def fake_urlopen(request, timeout=None):
        calls.append(request)
        return _FakeResponse(data)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    entry = {
        "url": "https://example.org/w.pt",
        "sha256": "0" * 64,
        "licence": "test",
        "backbone": "segresnet",
        "format": "universal",
        "filename": "test-weights.pt",
        "description": "test",
    }
    monkeypatch.setitem(PRETRAINED, "test-weights", entry)
    with pytest.raises(DownloadError, match="sha256"):
        load_pretrained("test-weights", progress=False)
    assert not list((tmp_path / "weights").glob("*"))

    monkeypatch.setitem(PRETRAINED, "test-weights", {**entry, "sha256": hashlib.sha256(data).hexdigest()})
    loaded = load_pretrained("test-weights", progress=False)
    assert loaded.class_names == ["liver"] and (tmp_path / "weights" / "test-weights.pt").is_file()
    load_pretrained("test-weights", progress=False)  # cached: no second download
    assert len(calls) == 2


def test_model_is_deepcopyable_and_movable() -> None:
    model = create_model("segresnet", classes=["liver"], encoder="onehot", embeddings=_embeddings(1))
    clone = copy.deepcopy(model)
    assert (
        clone.class_names == ["liver"]
        and clone.organ_embedding.data_ptr() != model.organ_embedding.data_ptr()
    )
    assert model.to(torch.float64).organ_embedding.dtype == torch.float64
