"""Weights sources against a local HTTP server on 127.0.0.1 (tests/weights_server.py): the registry file, resumable
downloads with progress, licence acceptance, recorded and checked sha256, offline messages, ``hf-hub:`` specs
against a local Hub endpoint, the ``universal models`` listing and the dashboard's Download control logic.

The served checkpoint is a copy of the shipped ``universal/resources/builtin.pt`` (a real model that segments)."""

from __future__ import annotations

import hashlib
import json

import pytest
from weights_server import COMMIT, closed_port, weights_server

from universal.errors import CheckpointError, DownloadError, InputError
from universal.model import load_pretrained, sources
from universal.model.checkpoints import builtin_weights_path

BLOB = builtin_weights_path().read_bytes()
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(scope="module")
def server():
    with weights_server() as srv:
        srv.files["/w/model.pt"] = BLOB
        srv.files["/w/other.pt"] = BLOB
        yield srv


@pytest.fixture()
def registry(server, tmp_path, monkeypatch):
    """A registry file with an open and a research-only entry, an empty cache; the server's log cleared."""
    entries = {
        "local-open": {"url": f"{server.url}/w/model.pt", "licence": "Apache-2.0", "backbone": "segresnet"},
        "local-nc": {
            "url": f"{server.url}/w/other.pt",
            "licence": "CC BY-NC-ND 4.0 (research only)",
            "backbone": "segresnet",
            "size": len(BLOB),
        },
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(entries))
    monkeypatch.setenv(sources.REGISTRY_ENV, str(path))
    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(tmp_path / "cache"))
    server.requests.clear()
    server.cut_next, server.ignore_range = None, False
    return tmp_path / "cache" / "weights"


def _manifest(folder) -> dict:
    return json.loads((folder / sources.MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------- downloads
def test_download_reports_progress_records_the_sha256_and_the_model_segments(registry):
    seen = []
    path = sources.download("local-open", progress=lambda done, total: seen.append((done, total)))
    assert path == registry / "local-open.pt" and path.read_bytes() == BLOB
    assert seen[-1] == (len(BLOB), len(BLOB)) and all(t == len(BLOB) for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 1
    assert _manifest(registry)["local-open.pt"]["sha256"] == SHA
    assert sources.checksum_state(sources.get_source("local-open")) == ("recorded", SHA)
    model = load_pretrained("local-open", progress=False)  # from the cache, checked
    assert model.class_names and model.backbone_name == "segresnet"


def test_an_interrupted_download_is_resumed_with_a_range_request(registry, server):
    server.cut_next = len(BLOB) // 3
    with pytest.raises(DownloadError, match="resume") as info:
        sources.download("local-open")
    assert "\n" not in str(info.value)
    part = registry / ".local-open.pt.part"
    assert part.stat().st_size == len(BLOB) // 3 and not (registry / "local-open.pt").exists()
    seen = []
    path = sources.download("local-open", progress=lambda done, total: seen.append(done))
    assert server.requests[-1]["range"] == f"bytes={len(BLOB) // 3}-"
    assert path.read_bytes() == BLOB and not part.exists()
    assert seen[0] > len(BLOB) // 3  # the bar starts where the part stopped
    assert _manifest(registry)["local-open.pt"]["sha256"] == SHA


def test_a_server_that_ignores_range_is_read_from_the_start(registry, server):
    server.cut_next = 1000
    with pytest.raises(DownloadError):
        sources.download("local-open")
    server.ignore_range = True  # answers 200 with the whole file to the Range request
    path = sources.download("local-open")
    assert server.requests[-1]["range"] == "bytes=1000-"
    assert path.read_bytes() == BLOB


def test_a_part_as_long_as_the_file_is_downloaded_again_after_416(registry, server):
    registry.mkdir(parents=True)
    part = registry / ".local-open.pt.part"
    part.write_bytes(b"x" * len(BLOB))  # whole length, wrong bytes: the server answers 416 to its Range
    path = sources.download("local-open")
    assert [r["range"] for r in server.requests] == [f"bytes={len(BLOB)}-", None]
    assert path.read_bytes() == BLOB and not part.exists()


def test_a_download_in_progress_elsewhere_is_not_written_into(registry, server):
    import fcntl

    registry.mkdir(parents=True)
    part = registry / ".local-open.pt.part"
    with open(part, "a+b") as other:  # another process or session holds the part
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="being downloaded by another"):
            sources.download("local-open")
    assert not server.requests and part.stat().st_size == 0
    assert sources.download("local-open").read_bytes() == BLOB


def test_a_corrupted_cached_file_is_refused_at_the_next_load(registry):
    path = sources.download("local-open")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_pretrained("local-open", progress=False)
    message = str(info.value)
    assert str(path) in message and SHA in message and hashlib.sha256(data).hexdigest() in message
    assert "Delete" in message


def test_a_pinned_sha256_that_does_not_match_deletes_the_download(registry, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pinned": {"url": sources.get_source("local-open").url, "licence": "MIT",
                                          "sha256": "0" * 64}}))  # fmt: skip
    monkeypatch.setenv(sources.REGISTRY_ENV, str(bad))
    with pytest.raises(DownloadError, match="sha256"):
        sources.download("pinned")
    assert not list(registry.glob("*pinned*")) and not (registry / sources.MANIFEST).exists()


def test_a_research_only_licence_must_be_accepted_once(registry, server):
    with pytest.raises(DownloadError, match="--accept-licence") as info:
        load_pretrained("local-nc", progress=False)
    assert "\n" not in str(info.value) and "CC BY-NC-ND" in str(info.value)
    assert not server.requests  # refused before any traffic
    assert not sources.licence_accepted(sources.get_source("local-nc"))
    path = sources.download("local-nc", accept_licence=True)
    assert path.read_bytes() == BLOB and sources.licence_accepted(sources.get_source("local-nc"))
    path.unlink()
    sources.download("local-nc")  # asked once: the acceptance is recorded
    assert sources.get_source("local-open").requires_acceptance is False


def test_an_unreachable_server_is_one_line_with_the_manual_alternative(registry, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/w/model.pt"
    reg = tmp_path / "offline.json"
    reg.write_text(json.dumps({"offline": {"url": url, "licence": "MIT"}}))
    monkeypatch.setenv(sources.REGISTRY_ENV, str(reg))
    with pytest.raises(DownloadError) as info:
        load_pretrained("offline", progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and "by hand" in message and "pass its path" in message
    assert not registry.exists() or not list(registry.glob("*offline*"))


# ---------------------------------------------------------------------------------------------- registry
def test_a_bad_registry_names_each_bad_entry_on_its_own_line(tmp_path, monkeypatch):
    reg = tmp_path / "r.json"
    reg.write_text(
        json.dumps(
            {
                "good": {"url": "http://127.0.0.1:1/a.pt", "licence": "MIT"},
                "no-licence": {"url": "http://127.0.0.1:1/a.pt"},
                "bad-url": {"url": "ftp://x/a.pt", "licence": "MIT"},
                "typo": {"url": "http://127.0.0.1:1/a.pt", "licence": "MIT", "sha": "x"},
                "escape": {"url": "http://127.0.0.1:1/a.pt", "licence": "MIT", "filename": "../a.pt"},
            }
        )
    )
    monkeypatch.setenv(sources.REGISTRY_ENV, str(reg))
    with pytest.raises(InputError) as info:
        sources.sources()
    lines = str(info.value).splitlines()
    assert "4 bad entries" in lines[0] and len(lines) == 5
    for name, why in [("no-licence", "licence"), ("bad-url", "http"), ("typo", "unknown field"),
                      ("escape", "plain file name")]:  # fmt: skip
        assert any(name in line and why in line for line in lines[1:]), (name, lines)
    reg.write_text(json.dumps({"builtin": {"url": "http://127.0.0.1:1/a.pt", "licence": "MIT"}}))
    with pytest.raises(InputError, match="redefines the built-in name"):
        sources.sources()
    reg.write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        sources.sources()


def test_registry_entries_extend_the_built_in_ones_and_unknown_names_list_them(registry):
    names = set(sources.sources())
    assert {"universal-unet", "universal-swinunetr", "builtin", "local-open", "local-nc"} <= names
    assert sources.get_source("universal-unet").requires_acceptance  # the official CC BY-NC-ND weights
    with pytest.raises(CheckpointError, match="local-open"):
        load_pretrained("no-such-weights")


# ---------------------------------------------------------------------------------------------- the Hub
@pytest.mark.parametrize(
    "text, repo, file, revision",
    [
        ("hf-hub:org/repo", "org/repo", sources.HUB_DEFAULT_FILE, "main"),
        ("hf-hub:org/repo:unet.pth", "org/repo", "unet.pth", "main"),
        ("hf-hub:org/repo@v1.0", "org/repo", sources.HUB_DEFAULT_FILE, "v1.0"),
        ("HF-HUB:my-org/my.repo:sub/w.pt@" + COMMIT, "my-org/my.repo", "sub/w.pt", COMMIT),
    ],
)
def test_hub_specs_parse(text, repo, file, revision):
    assert sources.parse_hub_spec(text) == sources.HubSpec(repo, file, revision)


@pytest.mark.parametrize(
    "text, why",
    [
        ("hf-hub:", "not a Hugging Face"),
        ("hf-hub:repo-without-org", "ORG/REPO"),
        ("hf-hub:a/b/c", "ORG/REPO"),
        ("hf-hub:org/repo:", "path inside"),
        ("hf-hub:org/repo:../x.pt", "path inside"),
        ("hf-hub:org/repo@", "revision"),
        ("hf-hub:org/repo@bad rev", "revision"),
    ],
)
def test_bad_hub_specs_are_one_line(text, why):
    with pytest.raises(InputError, match=why) as info:
        sources.parse_hub_spec(text)
    assert "\n" not in str(info.value) and "hf-hub:ORG/REPO[:FILE][@REVISION]" in str(info.value)


@pytest.fixture()
def hub(server, tmp_path, monkeypatch):
    """The server as the Hub endpoint (repo org/weights, file unet.pt at revision v1.0 only), an empty Hub cache."""
    server.hub[("org/weights", "unet.pt")] = BLOB
    server.hub_revisions = {"v1.0"}
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("UNIVERSAL_CACHE_DIR", str(tmp_path / "cache"))
    server.requests.clear()
    return server


def test_a_hub_spec_with_a_pinned_revision_downloads_and_loads(hub, tmp_path):
    from universal.predictor import Predictor

    model = load_pretrained("hf-hub:org/weights:unet.pt@v1.0")
    assert model.backbone_name == "segresnet"
    paths = [r["path"] for r in hub.requests]
    assert "/org/weights/resolve/v1.0/unet.pt" in paths  # the pinned revision reached the URL
    files = list((tmp_path / "hub").rglob("unet.pt"))
    assert files and files[0].read_bytes() == BLOB and COMMIT in str(files[0])
    manifest = _manifest(tmp_path / "cache" / "weights")
    assert manifest[f"hf-hub:org/weights:unet.pt@{COMMIT}"]["sha256"] == SHA
    assert Predictor("hf-hub:org/weights:unet.pt@v1.0").classes == model.class_names


def test_hub_errors_are_one_line(hub, monkeypatch):
    with pytest.raises(DownloadError) as info:  # a revision the repository does not have
        sources.fetch_hub("hf-hub:org/weights:unet.pt@v2.0")
    message = str(info.value)
    assert "\n" not in message and "hf-hub:org/weights:unet.pt@v2.0" in message and "Revision" in message
    with pytest.raises(DownloadError, match="EntryNotFound"):  # a file the repository does not have
        sources.fetch_hub("hf-hub:org/weights@v1.0")  # the default file
    assert hub.requests[-1]["path"] == f"/org/weights/resolve/v1.0/{sources.HUB_DEFAULT_FILE}"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(DownloadError) as info:  # offline, nothing cached
        load_pretrained("hf-hub:org/weights:unet.pt@v1.0")
    message = str(info.value)
    assert "\n" not in message and "unreachable" in message and "pass its path" in message


def test_offline_a_cached_hub_file_still_loads(hub, monkeypatch):
    sources.fetch_hub("hf-hub:org/weights:unet.pt@v1.0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert load_pretrained("hf-hub:org/weights:unet.pt@v1.0").backbone_name == "segresnet"


def test_a_changed_hub_file_is_refused_at_the_next_load(hub, tmp_path):
    sources.fetch_hub("hf-hub:org/weights:unet.pt@v1.0")
    blob = next((tmp_path / "hub").rglob("blobs/*"))
    blob.write_bytes(BLOB[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="Delete"):
        load_pretrained("hf-hub:org/weights:unet.pt@v1.0")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_models_lists_every_source_with_licence_size_cache_and_checksum(registry, capsys):
    from universal.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    assert "universal-unet" in line and "CC BY-NC-ND 4.0" in line["universal-unet"]
    assert "not cached" in line["local-open"] and "sha256 none" in line["local-open"]
    assert sources.human_size(len(BLOB)) in line["local-nc"] and "--accept-licence" in line["local-nc"]
    assert "shipped" in line["builtin"] and "hf-hub:ORG/REPO" in out
    # the shipped file's own digest, the one MODEL_CARD.md states
    builtin_sha = sources.sha256_of(builtin_weights_path())
    assert f"sha256 shipped {builtin_sha}" in line["builtin"]

    assert main(["models", "download", "local-nc"]) == 2  # licence not accepted
    assert "--accept-licence" in capsys.readouterr().err
    assert main(["models", "download", "local-nc", "--accept-licence"]) == 0
    assert SHA in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("  local-nc"))
    assert "cached" in row and "not cached" not in row and f"sha256 recorded {SHA}" in row


# ---------------------------------------------------------------------------------------------- dashboard
def test_dashboard_offer_download_and_selector(registry):
    from universal import app_logic as al
    from universal import weights_panel as wp

    assert wp.offer("builtin") is None and wp.offer(al.DEMO_MODEL) is None
    choice = {c.key: c for c in al.model_choices()}["local-nc"]
    assert not choice.available and "models download local-nc" in choice.note
    offer = wp.offer("local-nc")
    assert offer.needs_checkbox and not offer.cached and "CC BY-NC-ND" in offer.accept_label
    assert any(sources.human_size(len(BLOB)) in line for line in offer.lines)
    with pytest.raises(DownloadError, match="accept"):
        wp.download("local-nc", accept_licence=False)
    bar = []
    sha = wp.download("local-nc", accept_licence=True, bar=lambda f, text: bar.append((f, text)))
    assert sha == SHA and bar[-1][0] == 1.0 and len(bar) <= 102
    assert [f for f, _ in bar] == sorted(f for f, _ in bar)
    offer = wp.offer("local-nc")
    assert offer.cached and not offer.needs_checkbox and SHA in offer.sha_line
    assert {c.key: c for c in al.model_choices()}["local-nc"].available


def test_dashboard_offer_shows_a_partial_download(registry, server):
    from universal import weights_panel as wp

    server.cut_next = len(BLOB) // 2
    with pytest.raises(DownloadError):
        wp.download("local-open", accept_licence=False)
    offer = wp.offer("local-open")
    assert offer.partial == len(BLOB) // 2 and any("resumes" in line for line in offer.lines)


def test_dashboard_loads_a_hub_spec_given_as_the_checkpoint(hub):
    from universal import app_logic as al

    model = al.load_model(al.CHECKPOINT, checkpoint="hf-hub:org/weights:unet.pt@v1.0")
    assert model.backbone_name == "segresnet"


@pytest.mark.slow
def test_cli_segment_takes_a_hub_spec_as_weights(hub, tmp_path, capsys):
    from universal.cli import main
    from universal.io import save_volume
    from universal.phantom import make_phantom
    from universal.predictor import clear_model_cache

    clear_model_cache()  # the Predictor keeps loaded models per process: load this one from the Hub
    ct = save_volume(make_phantom(shape=(48, 48, 40), spacing=(3.0, 3.0, 3.0)).volume, tmp_path / "ct.nii.gz")
    spec = "hf-hub:org/weights:unet.pt@v1.0"
    code = main(["segment", str(ct), "-o", str(tmp_path / "out"), "--weights", spec, "--classes", "liver"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "ct" / "masks" / "liver.nii.gz").is_file()
    assert "/org/weights/resolve/v1.0/unet.pt" in [r["path"] for r in hub.requests]


def test_prepare_weights_downloads_accepts_or_refuses_an_option_that_would_do_nothing(registry, tmp_path):
    with pytest.raises(DownloadError, match="--accept-licence"):
        sources.prepare_weights("local-nc")  # research only, not accepted: nothing downloaded
    assert not (registry / "local-nc.pt").exists()
    assert sources.prepare_weights("local-nc", accept_licence=True) == registry / "local-nc.pt"
    assert sources.prepare_weights("local-nc") == registry / "local-nc.pt"  # accepted once, cached
    assert (
        sources.prepare_weights("builtin") is None and sources.prepare_weights(builtin_weights_path()) is None
    )
    for weights, what in [("builtin", "licensed Apache-2.0"), ("local-open", "licensed Apache-2.0"),
                          (str(builtin_weights_path()), "a file"), ("hf-hub:org/weights", "a Hub file")]:  # fmt: skip
        with pytest.raises(InputError, match="no licence to accept; leave it out") as info:
            sources.prepare_weights(weights, accept_licence=True)
        assert what in str(info.value) and "\n" not in str(info.value)
    assert not (registry / "local-open.pt").exists()  # refused before any download


@pytest.mark.slow
def test_cli_segment_accepts_a_licence_then_downloads_once_and_segments(registry, server, tmp_path, capsys):
    from universal.cli import main
    from universal.io import save_volume
    from universal.phantom import make_phantom
    from universal.predictor import clear_model_cache

    clear_model_cache()
    ct = save_volume(make_phantom(shape=(48, 48, 40), spacing=(3.0, 3.0, 3.0)).volume, tmp_path / "ct.nii.gz")
    argv = ["segment", str(ct), "--weights", "local-nc", "--classes", "liver", "--fast"]
    assert main([*argv, "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--accept-licence" in err[0] and not (tmp_path / "refused").exists()
    assert server.requests == []  # nothing was sent before the licence is accepted
    assert main([*argv, "-o", str(tmp_path / "out"), "--accept-licence"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "ct" / "masks" / "liver.nii.gz").is_file()
    assert [r["path"] for r in server.requests] == ["/w/other.pt"]  # one download
    assert (
        main(["segment", str(ct), "--weights", "builtin", "--accept-licence", "-o", str(tmp_path / "b")]) == 2
    )
    assert "no licence to accept" in capsys.readouterr().err and not (tmp_path / "b").exists()
