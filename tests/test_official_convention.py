"""The ``"official"`` grid convention against an independent chain assembled here from MONAI's transforms.

The reference chain below follows ``../shared/reference/OFFICIAL_PIPELINE.md`` step by step with MONAI's own
dictionary transforms (``LoadImaged`` → ``EnsureChannelFirstd`` → ``Orientationd`` → ``Spacingd`` →
``ScaleIntensityRanged`` → ``CropForegroundd``, ``sliding_window_inference`` with MONAI 0.9.0's Gaussian map built
from ``GaussianFilter``, sigmoid, ``> 0.5``, ``Invertd``); it calls nothing of ``universal`` but the network.
Both chains run the same random official-format U-Net (saved in the release's layout, read by ``load_official``)
on real CTs stored in a non-RAS order: a 3 mm abdomen crop stored LPS (resampled to 1.5 mm), the LPS 1.5 mm aorta
CTA, and the DICOM series. Windows are 48³ where a case needs several (the U-Net costs ~3 s per 48³ window and
~17 s per 96³ window on 2 CPU cores); the 1.5 mm case runs the spec's own 96³ windows. Forward passes are memoised
on the exact bytes of the window, so a window both chains feed identically is computed once (a window that
differed would simply be computed again).
"""

from __future__ import annotations

import hashlib
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from universal.errors import InputError

PATCH = (48, 48, 48)


# ------------------------------------------------------------------------------------------------- the weights
class _MemoForward:
    """``model.forward`` memoised on the window's bytes and the classes (the network is the same in both chains)."""

    def __init__(self, model):
        self.forward = model.forward
        self.names = tuple(model.class_names)
        self.store: dict = {}
        self.computed = 0

    def __call__(self, x, classes=None):
        names = self.names if classes is None else tuple(str(c) for c in classes)
        key = (
            hashlib.sha1(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest(),
            tuple(x.shape),
            names,
        )
        if key not in self.store:
            self.computed += 1
            self.store[key] = self.forward(x, classes=None if classes is None else list(classes)).detach()
        return self.store[key].clone()


def _calibrated_official_state(probe: np.ndarray, contrast: float = 12000.0) -> dict[str, torch.Tensor]:
    """A random U-Net in the official layout whose classes each segment about half of a CT window.

    A random network's logits are nearly constant (spatial std ~1e-5) and of one sign. The heads are made to
    depend on the class only (the controller's image part is zeroed, so a window's mean logit does not follow its
    global feature), the controller rows of the last head layer's weights are scaled by ``contrast`` (probabilities
    spread over [0, 1]), and each class's last bias gets minus its median logit on ``probe`` through two reserved
    text features (``relu`` of embedding columns 32 and 33, which feed nothing else).
    """
    from universal.model import create_model
    from universal.model.universal_model import CONTROLLER_SPLITS, GLOBAL_DIM

    torch.manual_seed(0)
    net = create_model("unet", classes=None, encoder="table:official-clip", embed_dim=512).eval()
    w3 = slice(CONTROLLER_SPLITS[0] + CONTROLLER_SPLITS[1], sum(CONTROLLER_SPLITS) - 1)
    b3 = sum(CONTROLLER_SPLITS) - 1
    pos, neg = GLOBAL_DIM - 1, GLOBAL_DIM - 2
    tv = net.text_to_vision
    with torch.no_grad():
        net.organ_embedding.copy_(torch.eye(32, 512) + 0.05 * torch.randn(32, 512))
        net.organ_embedding[:, 32:34] = 0.0
        tv.weight[:, 32:34] = 0.0
        net.controller.weight[:, :GLOBAL_DIM] = 0.0
        net.controller.weight[w3] *= contrast
        net.controller.bias[w3] *= contrast
        for c in (pos, neg):
            tv.weight[c] = 0.0
            tv.bias[c] = 0.0
            net.controller.weight[:, GLOBAL_DIM + c] = 0.0
        median = net(torch.from_numpy(probe)[None, None]).flatten(2).median(dim=2).values[0]
        tv.weight[pos, 32] = 1.0
        tv.weight[neg, 33] = 1.0
        net.organ_embedding[:, 32] = torch.clamp(-median, min=0.0)
        net.organ_embedding[:, 33] = torch.clamp(median, min=0.0)
        net.controller.weight[b3, GLOBAL_DIM + pos] = 1.0
        net.controller.weight[b3, GLOBAL_DIM + neg] = -1.0
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def official_net(shared_data, tmp_path_factory):
    """The calibrated random U-Net, saved in the release's layout and read back by ``load_official``."""
    from universal.model import load_official

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hu = np.asanyarray(nib.load(shared_data / "ts_abdomen_3mm" / "ct.nii.gz").dataobj)[40:88, 40:88, :]
    probe = np.clip((np.repeat(hu[:, :, 6:22], 3, axis=2)[:, :, :48] + 175.0) / 425.0, 0, 1).astype(
        np.float32
    )
    state = _calibrated_official_state(probe)
    path = tmp_path_factory.mktemp("official") / "unet.pth"
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, path)
    net = load_official(path)
    memo = _MemoForward(net)
    net.forward = memo  # instance attribute: nn.Module.__call__ uses it
    return net


# ------------------------------------------------------------------------------------------------- the cases
def _save_nifti(arr: np.ndarray, affine: np.ndarray, path) -> str:
    img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, path)
    return str(path)


def _crop_affine(affine: np.ndarray, start) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return out


@pytest.fixture(scope="module")
def lps_3mm(shared_data, tmp_path_factory) -> str:
    """A 36×33×16 crop of the 3 mm abdomen (RAS on disk) stored in LPS order, with air on one side."""
    im = nib.load(shared_data / "ts_abdomen_3mm" / "ct.nii.gz")
    arr = np.asanyarray(im.dataobj)[40:76, 68:101, 6:22]
    affine = _crop_affine(im.affine, (40, 68, 6))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [arr.shape[0] - 1, arr.shape[1] - 1]
    path = _save_nifti(arr[::-1, ::-1], affine @ flip, tmp_path_factory.mktemp("lps3") / "ct.nii.gz")
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")
    return path


@pytest.fixture(scope="module")
def lps_1p5mm(shared_data, tmp_path_factory) -> str:
    """A 90×70×40 crop of the 1.5 mm aorta CTA, in its own LPS order (one 96³ window, padded on every side)."""
    im = nib.load(shared_data / "ts_aorta_1p5mm" / "ct.nii.gz")
    assert nib.aff2axcodes(im.affine) == ("L", "P", "S")
    arr = np.asanyarray(im.dataobj)[10:100, 20:90, 60:100]
    return _save_nifti(
        arr, _crop_affine(im.affine, (10, 20, 60)), tmp_path_factory.mktemp("lps15") / "ct.nii.gz"
    )


@pytest.fixture(scope="module")
def dicom_crop(shared_data):
    """A 100×100×20 crop (file order, air on one side) of the DICOM series: (RAS+ Volume, file array, affine)."""
    from universal.io import load_volume, volume_from_array

    vol = load_volume(shared_data / "ts_dicom_series" / "dicom")
    src = vol.to_source_order(vol.array)[200:300, 130:230, :]
    affine = _crop_affine(vol.source.original_affine, (200, 130, 0))
    return volume_from_array(np.ascontiguousarray(src), affine=affine, name="dicom"), np.array(src), affine


# ---------------------------------------------------------------------------------------- the reference chain
def _reference_map(patch) -> torch.Tensor:
    """MONAI 0.9.0's importance map: an impulse at size // 2 blurred by GaussianFilter (σ = 0.125 size), max 1."""
    from monai.networks.layers import GaussianFilter

    impulse = torch.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1.0
    with torch.no_grad():
        w = GaussianFilter(3, [p * 0.125 for p in patch])(impulse[None, None])
    return w / w.max()


def _reference(source, net, patch) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, masks), (32, X, Y, Z) in the file's own voxel order, by the official chain's steps."""
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    steps = [
        Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys="image", source_key="image"),
    ]
    if isinstance(source, str):  # a NIfTI file, as the release reads it
        chain = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), *steps])
        data = chain({"image": source})
    else:  # (file-order array, affine): the DICOM series as read into memory
        chain = Compose(steps)
        arr, affine = source
        data = chain({"image": MetaTensor(torch.from_numpy(arr.astype(np.float32))[None], affine=affine)})
    image = data["image"]
    with torch.no_grad():
        logits = sliding_window_inference(
            image[None].as_tensor(),
            patch,
            1,
            net,
            overlap=0.5,
            mode="gaussian",
            roi_weight_map=_reference_map(patch),
        )
        prob = torch.sigmoid(logits)[0]
    data["prob"] = MetaTensor(prob, affine=image.affine)
    data["mask"] = MetaTensor((prob > 0.5).float(), affine=image.affine)
    data = Invertd(keys="prob", transform=chain, orig_keys="image", nearest_interp=False)(data)
    data = Invertd(keys="mask", transform=chain, orig_keys="image", nearest_interp=True)(data)
    return np.asarray(data["prob"].as_tensor()), np.asarray(data["mask"].as_tensor()) > 0.5


def _ours(source, net, patch=None):
    """(probabilities, masks, segmentation) of ``universal.segment`` in the file's voxel order (spec defaults)."""
    import universal

    seg = universal.segment(source, model=net, patch_size=patch, postprocess=False, return_probabilities=True)
    names = list(net.class_names)
    probs = seg.volume.to_source_order(np.stack([seg.probabilities[n] for n in names]))
    masks = seg.volume.to_source_order(np.stack([seg.masks[n] for n in names]))
    return probs, masks, seg


def _check_against_reference(source, reference_source, net, patch=None):
    """Ours first, then the reference chain: each of its windows must be bit-identical to one of ours (the memo
    computes nothing new), its probabilities equal to float32 rounding and its masks exactly."""
    p_ours, m_ours, seg = _ours(source, net, patch)
    computed = net.forward.computed
    p_ref, m_ref = _reference(reference_source, net, patch or (96, 96, 96))
    assert net.forward.computed == computed, "the reference chain fed the network other windows"
    assert p_ours.shape == p_ref.shape and m_ours.shape == m_ref.shape
    assert p_ours.dtype == np.float32
    dp = np.abs(p_ours.astype(np.float64) - p_ref)
    assert dp.mean() <= 1e-5, (dp.mean(), dp.max())
    assert np.array_equal(m_ours, m_ref), int((m_ours != m_ref).sum())
    # the test has power: several classes are neither empty nor full on this CT
    frac = m_ref.reshape(len(m_ref), -1).mean(axis=1)
    assert int(((frac > 0.05) & (frac < 0.95)).sum()) >= 8, frac.round(2)
    assert seg.info["convention"] == "official" and seg.info["blending"] == "monai-0.9.0"
    assert seg.info["precision"] == "float32"
    return seg


# ---------------------------------------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_lps_3mm_ct_is_segmented_exactly_as_the_official_chain(official_net, lps_3mm):
    """Resampling 3 → 1.5 mm, an LPS file, a crop that removes air, 4 overlapping 48³ windows."""
    _check_against_reference(lps_3mm, lps_3mm, official_net, PATCH)


@pytest.mark.slow
def test_lps_1p5mm_ct_with_the_specs_96_windows_is_exact(official_net, lps_1p5mm):
    """The spec's own window (96³, overlap 0.5) on the LPS 1.5 mm CTA (no resampling: already at 1.5 mm)."""
    seg = _check_against_reference(lps_1p5mm, lps_1p5mm, official_net)
    assert seg.info["patch_size"] == [96, 96, 96] and seg.info["overlap"] == 0.5


@pytest.mark.slow
def test_dicom_series_is_segmented_exactly_as_the_official_chain(official_net, dicom_crop):
    """0.98 × 0.98 × 2 mm DICOM geometry (file order LPS-like), resampled to 1.5 mm."""
    volume, arr, affine = dicom_crop
    _check_against_reference(volume, (arr, affine), official_net, PATCH)


@pytest.mark.slow
def test_default_postprocessing_runs_on_the_official_grid(official_net, dicom_crop):
    """``postprocess=True`` (the default) cleans the official chain's masks on its 1.5 mm grid: each class keeps
    a part of its raw mask (sides of paired organs may swap), and ``postprocess=False`` is the raw chain."""
    import universal

    volume = dicom_crop[0]
    raw = universal.segment(volume, model=official_net, patch_size=PATCH, postprocess=False)
    clean = universal.segment(volume, model=official_net, patch_size=PATCH)
    assert clean.info["postprocess"] and not raw.info["postprocess"]
    for name in ("liver", "spleen", "pancreas", "stomach"):
        assert not (clean.masks[name] & ~raw.masks[name]).any(), name
    assert sum(int(m.sum()) for m in clean.masks.values()) < sum(int(m.sum()) for m in raw.masks.values())


def test_masks_go_back_in_one_inversion_as_invertd_gives_each(shared_data):
    """The packed (bit) nearest inversion of many masks equals ``Invertd(nearest_interp=True)`` of their stack,
    and probabilities go back as ``Invertd``'s bilinear inversion."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from universal.io import load_volume, volume_from_array
    from universal.preprocess import PreprocessConfig, prepare_official

    vol = load_volume(shared_data / "ts_abdomen_3mm" / "ct.nii.gz")
    small = volume_from_array(vol.array[30:70, 20:60, 4:24], affine=_crop_affine(vol.affine, (30, 20, 4)))
    prepared = prepare_official(
        small, PreprocessConfig(foreground_hu=-175.0, margin_mm=0.0, convention="official")
    )
    rng = np.random.default_rng(0)
    masks = rng.random((20, *prepared.shape)) > 0.6  # 20 masks: two packed channels
    probs = rng.random((3, *prepared.shape)).astype(np.float32)
    inv = Invertd(keys="p", transform=prepared.transform, orig_keys="image", nearest_interp=True)
    ref = inv({"image": prepared.image, "p": MetaTensor(torch.from_numpy(masks.astype(np.float32)))})["p"]
    assert np.array_equal(prepared.to_source(masks), np.asarray(ref) > 0.5)
    assert np.array_equal(prepared.to_source(masks[4]), np.asarray(ref)[4] > 0.5)
    inv = Invertd(keys="p", transform=prepared.transform, orig_keys="image", nearest_interp=False)
    ref = inv({"image": prepared.image, "p": MetaTensor(torch.from_numpy(probs))})["p"]
    assert np.array_equal(prepared.to_source(probs, chunk=2), np.asarray(ref))
    assert prepared.to_source(masks).shape == (20, *small.shape)


def test_official_gaussian_weights_are_monai_090s():
    from universal.inference import gaussian_weights, official_gaussian_weights

    w = official_gaussian_weights((96, 96, 96))
    assert w.shape == (1, 1, 96, 96, 96) and w.dtype == torch.float32
    assert float(w[0, 0, 48, 48, 48]) == 1.0 and 1e-11 < float(w.min()) < 1e-10
    assert torch.equal(w, _reference_map((96, 96, 96)))
    # MONAI >= 1.x is centred on 47.5 and floored at 1e-3: not the release's blending
    assert float((gaussian_weights((96, 96, 96)) - w[0, 0]).abs().max()) > 1e-3


def test_official_spec_runs_the_official_convention_and_the_project_its_own(shared_reference):
    from universal.model import create_model
    from universal.predictor import Predictor

    own = create_model("segresnet", classes=["liver"], encoder="onehot", embed_dim=4)
    assert Predictor(own, device="cpu").resolved.preprocessing.convention == "universal"
    switched = Predictor(own, device="cpu", convention="official").resolved
    assert switched.preprocessing.convention == "official"
    assert switched.preprocessing.spacing_mm == own.spec.preprocessing.spacing_mm
    with pytest.raises(InputError, match="convention"):
        Predictor(own, device="cpu", convention="nnunet")


def test_cli_convention_option_reaches_the_settings():
    from universal.cli import _settings_from_args, build_parser
    from universal.preprocess import CONVENTIONS

    parser = build_parser()
    args = parser.parse_args(["segment", "ct.nii.gz", "-o", "out", "--convention", "official"])
    assert _settings_from_args(args).convention == "official"
    assert _settings_from_args(parser.parse_args(["segment", "ct.nii.gz", "-o", "out"])).convention is None
    assert set(CONVENTIONS) == {"universal", "official"}
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser.parse_args(["segment", "ct.nii.gz", "-o", "out", "--convention", "nnunet"])
