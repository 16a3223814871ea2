"""universal.prompts: templates, text encoders (minilm, clip, table, onehot) and the embedding cache."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from universal import prompts
from universal.errors import EncoderUnavailableError, InputError, UniversalError
from universal.prompts import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    ClipEncoder,
    MiniLMEncoder,
    OneHotEncoder,
    TableEncoder,
    TextEncoder,
    encode_prompts,
    format_prompt,
    get_encoder,
    list_templates,
    prompt_similarity,
    resolve_template,
)
from universal.taxonomy import CLASSES, resolve_class, resolve_classes

OFFICIAL_TABLE = "clip_vitb32_official_prompt_embeddings.npy"


def _row(emb: np.ndarray, classes: list, name: str) -> np.ndarray:
    return emb[[c.name for c in classes].index(name)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class CountingEncoder(TextEncoder):
    """A deterministic model-free text encoder (hash of the prompt) that records every call."""

    def __init__(self, name: str = "counting", dim: int = 8) -> None:
        self._name, self._dim = name, dim
        self.calls: list[list[str]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[: self._dim], np.uint8) for t in texts]
        return np.asarray(rows, np.float32) / 255.0


# ----------------------------------------------------------------------------------------------- templates
def test_templates_of_the_paper():
    assert TEMPLATES["ct"] == "A computerized tomography of a {}"
    assert TEMPLATES["photo"] == "A photo of a {}"
    assert TEMPLATES["there_is"] == "There is {} in this computerized tomography"
    assert DEFAULT_TEMPLATE == TEMPLATES["ct"]
    listed = list_templates()
    assert listed == TEMPLATES
    listed["ct"] = "changed"
    assert TEMPLATES["ct"] == "A computerized tomography of a {}"  # a copy


def test_resolve_template_keys_texts_and_free_text():
    assert resolve_template(None) == DEFAULT_TEMPLATE
    assert resolve_template("PHOTO") == TEMPLATES["photo"]
    assert resolve_template("there-is") == resolve_template("there is") == TEMPLATES["there_is"]
    assert resolve_template("An axial CT of the {} region") == "An axial CT of the {} region"
    assert resolve_template("  Contrast CT showing the {}  ") == "Contrast CT showing the {}"
    for bad in ("", "   ", "CT of {name}", "CT of {0}", "bogus", "Contrast CT showing the"):
        with pytest.raises(InputError):
            resolve_template(bad)


def test_format_prompt_uses_correct_spellings():
    aorta = resolve_class("aorta")
    assert format_prompt("ct", aorta) == "A computerized tomography of a Aorta"
    assert format_prompt("there_is", "liver tumor") == "There is Liver Tumor in this computerized tomography"
    assert format_prompt("photo", "celiac trunk") == "A photo of a Celiac Trunk"  # not the official "Truck"
    assert format_prompt("Contrast CT showing the {}", "liver") == "Contrast CT showing the Liver"
    assert format_prompt("{}", "spleen") == "Spleen"


# ------------------------------------------------------------------------------------------------ onehot
def test_onehot_is_identity_rows_and_ignores_template():
    enc = get_encoder("onehot")
    assert isinstance(enc, OneHotEncoder) and enc.name == "onehot" and enc.dim == 32
    full = encode_prompts(None, encoder="onehot")
    np.testing.assert_array_equal(full, np.eye(32, dtype=np.float32))
    assert full.dtype == np.float32
    sub = encode_prompts(["liver tumor", "spleen"], template="photo", encoder=enc)
    np.testing.assert_array_equal(sub, np.eye(32, dtype=np.float32)[[26, 0]])


# --------------------------------------------------------------------------------------------------- cache
def test_cache_hit_avoids_recomputation(tmp_path):
    enc = CountingEncoder()
    classes = resolve_classes(["liver", "spleen", "aorta"])
    first = encode_prompts(classes, "ct", enc, cache_dir=tmp_path)
    assert first.shape == (3, 8) and first.dtype == np.float32
    assert enc.calls == [[format_prompt("ct", c) for c in classes]]  # one batch for all missing rows
    again = encode_prompts(classes, "ct", enc, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first)
    assert len(enc.calls) == 1  # served from disk
    # a later process (a fresh encoder object with the same name) also hits the cache
    fresh = CountingEncoder()
    np.testing.assert_array_equal(encode_prompts(classes, "ct", fresh, cache_dir=tmp_path), first)
    assert fresh.calls == []
    # only the missing class is encoded; rows come back in the requested order
    mixed = encode_prompts(["pancreas", "aorta", "liver"], "ct", enc, cache_dir=tmp_path)
    assert enc.calls[-1] == ["A computerized tomography of a Pancreas"]
    np.testing.assert_array_equal(mixed[1:], first[[2, 0]])
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temporary files


def test_cache_keys_differ_by_template_encoder_and_class(tmp_path):
    enc = CountingEncoder()
    ct = encode_prompts(["liver", "spleen"], "ct", enc, cache_dir=tmp_path)
    photo = encode_prompts(["liver", "spleen"], "photo", enc, cache_dir=tmp_path)
    assert len(enc.calls) == 2 and not np.array_equal(ct, photo)
    # a template key and its text are the same template
    encode_prompts(["liver"], TEMPLATES["photo"], enc, cache_dir=tmp_path)
    assert len(enc.calls) == 2
    other = CountingEncoder(name="counting-v2")
    encode_prompts(["liver", "spleen"], "ct", other, cache_dir=tmp_path)
    assert len(other.calls) == 1  # another encoder name never reads this encoder's rows
    assert ct[0].tolist() != ct[1].tolist()
    files = sorted(p.name for p in tmp_path.rglob("*.npy"))
    assert len(files) == len(set(files)) == 6  # 2 classes x (ct, photo) + 2 for the other encoder


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    enc = CountingEncoder()
    good = encode_prompts(["liver", "spleen"], "ct", enc, cache_dir=tmp_path)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 2
    files[0].write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(files[1], np.zeros(3, np.float32))  # a readable file of the wrong shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recovery is silent apart from logging
        recovered = encode_prompts(["liver", "spleen"], "ct", enc, cache_dir=tmp_path)
    np.testing.assert_array_equal(recovered, good)
    assert len(enc.calls) == 2 and len(enc.calls[-1]) == 2
    for path in files:  # rewritten with valid rows
        assert np.load(path, allow_pickle=False).shape == (8,)
    encode_prompts(["liver", "spleen"], "ct", enc, cache_dir=tmp_path)
    assert len(enc.calls) == 2


def test_cache_dir_from_environment_and_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(tmp_path / "root"))
    assert prompts.default_cache_dir() == tmp_path / "root" / "embeddings"
    enc = CountingEncoder()
    encode_prompts(["liver"], "ct", enc)
    assert len(list((tmp_path / "root" / "embeddings").rglob("*.npy"))) == 1
    encode_prompts(["liver"], "ct", enc, cache_dir=False)
    assert len(enc.calls) == 2  # cache_dir=False always runs the encoder


# -------------------------------------------------------------------------------------------------- minilm
@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def test_minilm_real_semantics(minilm, tmp_path):
    assert get_encoder("minilm").name == minilm.name == "minilm" and minilm.dim == 384
    emb = encode_prompts(None, "ct", minilm, cache_dir=tmp_path)
    assert emb.shape == (32, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(
        np.linalg.norm(emb, axis=1), 1.0, atol=1e-5
    )  # normalised like sentence-transformers
    classes = list(CLASSES)
    tumor = _row(emb, classes, "liver tumor")
    assert _cos(tumor, _row(emb, classes, "liver")) > _cos(tumor, _row(emb, classes, "left femoral head"))
    right = _row(emb, classes, "right kidney")
    assert _cos(right, _row(emb, classes, "left kidney")) > _cos(right, _row(emb, classes, "bladder"))
    sim = prompt_similarity(emb)
    assert sim.shape == (32, 32)
    idx = {c.name: i for i, c in enumerate(classes)}
    assert sim[idx["kidney tumor"], idx["right kidney"]] > sim[idx["kidney tumor"], idx["esophagus"]]


def test_minilm_is_deterministic(minilm):
    classes = resolve_classes(["liver", "spleen", "pancreas tumor", "right adrenal gland"])
    a = minilm.encode_classes(classes, DEFAULT_TEMPLATE)
    b = minilm.encode_classes(classes, DEFAULT_TEMPLATE)
    np.testing.assert_array_equal(a, b)
    alone = minilm.encode_classes(classes[2:3], DEFAULT_TEMPLATE)  # batch composition does not matter
    np.testing.assert_allclose(alone[0], a[2], atol=1e-5)
    texts = minilm.encode_texts(["A computerized tomography of a Liver", "a cat on a sofa"])
    np.testing.assert_allclose(texts[0], a[0], atol=1e-5)
    assert _cos(texts[0], a[1]) > _cos(
        texts[1], a[1]
    )  # free text: an organ prompt is closer to another organ


def test_minilm_templates_change_embeddings(minilm):
    classes = resolve_classes(["liver", "spleen"])
    ct = minilm.encode_classes(classes, "ct")
    free = minilm.encode_classes(classes, "a contrast enhanced scan of the {}")
    assert not np.allclose(ct, free, atol=1e-3)


# --------------------------------------------------------------------------------------------------- table
def test_table_encoder_on_official_clip_embeddings(shared_reference):
    path = shared_reference / OFFICIAL_TABLE
    raw = np.load(path, allow_pickle=False)
    assert raw.shape == (32, 512) and raw.dtype == np.float16
    enc = get_encoder(f"table:{path}")
    assert isinstance(enc, TableEncoder)
    assert enc.name == "table:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert enc.dim == 512 and enc.template == DEFAULT_TEMPLATE and enc.template_source == "sidecar"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table's own template: no warning
        emb = encode_prompts(None, "ct", enc)
    assert emb.shape == (32, 512) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, raw.astype(np.float32))
    sub = enc.encode_classes(resolve_classes(["liver tumor", "spleen", "aorta"]), DEFAULT_TEMPLATE)
    np.testing.assert_array_equal(sub, raw[[26, 0, 7]].astype(np.float32))
    # real CLIP semantics in the official table
    classes = list(CLASSES)
    tumor = _row(emb, classes, "liver tumor")
    assert _cos(tumor, _row(emb, classes, "liver")) > _cos(tumor, _row(emb, classes, "left femoral head"))
    right = _row(emb, classes, "right kidney")
    assert _cos(right, _row(emb, classes, "left kidney")) > _cos(right, _row(emb, classes, "bladder"))
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=0.1)  # unnormalised, as released
    with pytest.warns(UserWarning, match="cannot re-encode"):
        other = enc.encode_classes(resolve_classes(["liver"]), "photo")
    np.testing.assert_array_equal(other[0], raw[5].astype(np.float32))


def test_table_pt_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    table = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    path = tmp_path / "txt_encoding.pth"
    torch.save(torch.from_numpy(table), path)
    enc = TableEncoder(path)
    assert enc.dim == 16 and enc.template_source == "assumed" and enc.template == DEFAULT_TEMPLATE
    np.testing.assert_array_equal(encode_prompts(None, encoder=enc), table)
    np.testing.assert_array_equal(enc.encode_classes(resolve_classes(["colon tumor"])), table[[30]])
    with pytest.warns(UserWarning):
        enc.encode_classes(resolve_classes(["liver"]), "there_is")
    # an official-style checkpoint {'net': state_dict} with the 'module.organ_embedding' buffer
    ckpt = tmp_path / "universal.pth"
    torch.save({"net": {"module.organ_embedding": torch.from_numpy(table), "module.x": torch.zeros(3)}}, ckpt)
    np.testing.assert_array_equal(TableEncoder(ckpt).table, table)
    # a sidecar json sets the template; the name depends on the content only
    side = tmp_path / "photo_table.npy"
    np.save(side, table)
    side.with_suffix(".json").write_text(json.dumps({"template": "A photo of a {}"}))
    photo = TableEncoder(side)
    assert photo.template == TEMPLATES["photo"] and photo.template_source == "sidecar"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        photo.encode_classes(resolve_classes(["liver"]), "photo")
    assert photo.name != enc.name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_table_rejects_pickles_garbage_and_wrong_shapes(tmp_path):
    pytest.importorskip("torch")
    pkl = tmp_path / "table.npy"
    pkl.write_bytes(pickle.dumps({"rows": [1.0, 2.0]}))
    with pytest.raises(InputError, match="pickle"):
        TableEncoder(pkl)
    obj_npy = tmp_path / "objects.npy"
    np.save(obj_npy, np.array([{"a": 1}] * 32, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickle"):
        TableEncoder(obj_npy)
    pt = tmp_path / "table.pt"
    pt.write_bytes(pickle.dumps(object()))
    with pytest.raises(InputError, match="weights_only"):
        TableEncoder(pt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a tensor at all" * 10)
    with pytest.raises(InputError):
        TableEncoder(garbage)
    for shape in [(31, 512), (32,), (2, 32, 512), (32, 0)]:
        bad = tmp_path / f"shape_{len(shape)}_{shape[0]}.npy"
        np.save(bad, np.zeros(shape, np.float32))
        with pytest.raises(InputError, match=r"\(32, D\)"):
            TableEncoder(bad)
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a"] * 4] * 32))
    with pytest.raises(InputError):
        TableEncoder(strings)
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        get_encoder(f"table:{tmp_path / 'missing.npy'}")
    with pytest.raises(EncoderUnavailableError, match="file"):
        get_encoder("table:1fa54533e343")  # a recorded name is not a file


# ------------------------------------------------------------------------------------------------- factory
def test_get_encoder_specs(monkeypatch):
    enc = OneHotEncoder()
    assert get_encoder(enc) is enc
    assert isinstance(get_encoder("MiniLM"), MiniLMEncoder)
    assert isinstance(get_encoder(" one-hot "), OneHotEncoder)
    with pytest.raises(EncoderUnavailableError) as info:
        get_encoder("word2vec")
    message = str(info.value)
    for spec in ("minilm", "clip", "table:", "onehot", "auto"):
        assert spec in message
    assert isinstance(info.value, UniversalError)
    monkeypatch.setattr(prompts, "clip_weights_available", lambda *a, **k: False)
    assert isinstance(get_encoder("auto"), MiniLMEncoder)
    assert isinstance(get_encoder(None), MiniLMEncoder)


def test_auto_without_clip_weights_in_cache_is_minilm():
    if prompts.clip_weights_available():
        pytest.skip("CLIP ViT-B-32/openai weights are cached here: 'auto' picks CLIP")
    assert get_encoder("auto").name == "minilm"


def test_prompt_similarity():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]], np.float32)
    sim = prompt_similarity(a)
    assert sim.shape == (3, 3) and sim.dtype == np.float32
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)
    np.testing.assert_allclose(sim, sim.T)
    assert sim[0, 1] == pytest.approx(1 / np.sqrt(2), abs=1e-6) and sim[0, 2] == pytest.approx(0.0, abs=1e-7)
    assert prompt_similarity(a, a[:2]).shape == (3, 2)
    with pytest.raises(InputError):
        prompt_similarity(a, np.ones((2, 3)))


def test_import_is_light():
    code = (
        "import sys, universal.prompts; "
        "print([m for m in ('torch', 'open_clip', 'sentence_transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------- clip
@pytest.fixture(scope="module")
def clip_random() -> ClipEncoder:
    pytest.importorskip("open_clip")
    return ClipEncoder("ViT-B-32", pretrained=None, allow_random=True, seed=0)


def test_clip_random_weights_same_code_path(clip_random, tmp_path):
    import open_clip

    assert clip_random.dim == 512 and clip_random.name == "clip:ViT-B-32:random-seed0"
    assert not clip_random.cacheable
    classes = resolve_classes(["liver", "liver tumor", "right kidney", "aorta"])
    ct = encode_prompts(classes, "ct", clip_random, cache_dir=tmp_path)
    assert ct.shape == (4, 512) and ct.dtype == np.float32 and np.all(np.isfinite(ct))
    assert not list(tmp_path.rglob("*.npy"))  # random weights are never cached
    there = clip_random.encode_classes(classes, "there_is")
    assert not np.allclose(ct, there, atol=1e-4)  # two templates give different embeddings
    assert not np.allclose(ct[0], ct[1], atol=1e-4)
    # the same tokenizer and encode_text, unnormalised
    import torch

    model = clip_random._get_model()
    tokens = open_clip.get_tokenizer("ViT-B-32")([format_prompt("ct", c) for c in classes])
    assert tokens.shape == (4, 77)
    with torch.no_grad():
        direct = model.encode_text(tokens, normalize=False).numpy()
    np.testing.assert_allclose(ct, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="allow_random"):
        ClipEncoder("ViT-B-32", pretrained=None)


def test_clip_local_weights_file(clip_random, tmp_path):
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):  # the same seeded init as the random encoder
        torch.manual_seed(0)
        full = open_clip.create_model(
            "ViT-B-32", pretrained=None, pretrained_image=False, pretrained_text=False
        )
    path = tmp_path / "vit_b_32_random.pt"
    torch.save(full.state_dict(), path)
    del full
    enc = get_encoder(f"clip:ViT-B-32:{path}")
    assert isinstance(enc, ClipEncoder) and enc.cacheable
    assert re.fullmatch(r"clip:ViT-B-32:file-[0-9a-f]{12}", enc.name)  # identity = content hash, not the path
    classes = resolve_classes(["spleen", "kidney cyst"])
    from_file = encode_prompts(classes, "photo", enc, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(from_file, clip_random.encode_classes(classes, "photo"), rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


@pytest.mark.timeout(120)
def test_clip_offline_fails_fast_naming_alternatives(monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setattr(prompts, "_local_clip_weights", lambda *a, **k: None)  # as if nothing were cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("clip", "clip:ViT-B-32:openai"):
        with pytest.raises(EncoderUnavailableError) as info:
            get_encoder(spec)
        message = str(info.value)
        for alternative in ("minilm", "table:", "onehot", "open_clip.create_model", "HF_HUB_OFFLINE"):
            assert alternative in message
    # not flagged offline, but the hub cannot be reached: the connection probe fails fast too
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(prompts, "_hf_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EncoderUnavailableError, match="minilm"):
        ClipEncoder("ViT-B-32", "openai", probe_timeout=2.0)
    with pytest.raises(EncoderUnavailableError, match="not in the local cache"):
        ClipEncoder("ViT-B-32", "openai", download=False)


def test_clip_bad_specs():
    pytest.importorskip("open_clip")
    with pytest.raises(EncoderUnavailableError, match="tags"):
        get_encoder("clip:ViT-B-32:no-such-tag")
    with pytest.raises(EncoderUnavailableError, match="list_models"):
        get_encoder("clip:ViT-Q-99")
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        get_encoder("clip:ViT-B-32:/no/such/weights.pt")
    with pytest.raises(EncoderUnavailableError, match="weights file"):
        get_encoder("clip:ViT-B-32:file-0123456789ab")


def test_clip_weights_file_of_another_architecture(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    path = tmp_path / "wrong.pt"
    torch.save({"text_projection": torch.zeros(3, 3)}, path)
    enc = ClipEncoder("ViT-B-32", str(path))
    with pytest.raises(EncoderUnavailableError, match="Cannot load"):
        enc.encode_texts(["A photo of a Liver"])


def test_official_table_name_is_stable(shared_reference):
    path = Path(shared_reference) / OFFICIAL_TABLE
    assert TableEncoder(path).name == TableEncoder(str(path)).name
