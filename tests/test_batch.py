"""Batch inference (issue 16): case lists, settings, prefetch, resume, summaries, ranks, efficiency numbers.

Fast tests use a tiny random-weights SegResNet on small phantoms (6 mm, 16³ windows); orderings are checked with
events, never with timings. The slow test runs ``torchrun`` with 2 gloo ranks against a single-process run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from badinput import checksums, leftovers, tiny_checkpoint

import universal
from universal import batch, cli, distributed, efficiency
from universal.batch import BatchPlan, BatchRunner, BatchSettings, collect_cases, plan_batch, read_manifest
from universal.distributed import Ranks
from universal.errors import InputError
from universal.io import save_volume

CLASSES = ["liver", "spleen", "right kidney"]
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three small phantom CTs in a folder, a file that is not a CT, and a tiny random-weights checkpoint."""
    d = tmp_path_factory.mktemp("batch")
    cts = d / "cts"
    for seed in range(3):
        ph = universal.make_phantom((40, 40, 32), spacing=(4.0, 4.0, 4.0), seed=seed)
        save_volume(ph.volume, cts / f"case{seed}.nii.gz")
    (d / "broken.nii.gz").write_bytes(b"not a nifti file")
    weights = tiny_checkpoint(d / "tiny.pt", CLASSES)
    return {"dir": d, "cts": cts, "broken": d / "broken.nii.gz", "weights": weights}


@pytest.fixture(scope="module")
def predictor(data):
    return universal.Predictor(str(data["weights"]), device="cpu", postprocess=False)


def run(predictor, inputs, out, **settings):
    s = BatchSettings(**settings)
    plan = plan_batch([str(i) for i in inputs], out, s)
    lines: list[str] = []
    result = BatchRunner(predictor, plan, echo=lambda line, error=False: lines.append(line)).run()
    return result, lines


def labels(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(folder / "labels.nii.gz").dataobj)


# ----------------------------------------------------------------------------------------------- case lists
def test_csv_manifest_paths_are_relative_to_it_and_names_are_used(data, tmp_path, monkeypatch):
    m = data["dir"] / "list.csv"
    m.write_text("image,name,label\ncts/case0.nii.gz,first,\ncts/case1.nii.gz,,x\n")
    monkeypatch.chdir(tmp_path)  # resolved against the manifest's folder, not the current one
    cases, from_batch = collect_cases([str(m)])
    assert [c.source for c in cases] == [str(data["cts"] / "case0.nii.gz"), str(data["cts"] / "case1.nii.gz")]
    assert [c.name for c in cases] == ["first", "case1"] and from_batch
    assert cases[0].origin == "manifest list.csv line 2"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("path\ncts/case0.nii.gz\n", "line 1: no column 'image'"),
        ("image\ncts/case0.nii.gz\ncts/nope.nii.gz\n", "line 3: cts/nope.nii.gz does not exist"),
        (
            "image\ncts/case0.nii.gz\n./cts/case0.nii.gz\n",
            "line 3: ./cts/case0.nii.gz repeats list.csv line 2",
        ),
        ("image,name\ncts/case0.nii.gz,\n,x\n", "line 3: the image is empty"),
        ("image,name\ncts/case0.nii.gz,../up\n", "line 2: name '../up' holds a path separator"),
        ("image,name\ncts/case0.nii.gz,.hid\n", "line 2: name '.hid' starts with a dot"),
        ("image,name\ncts/case0.nii.gz,A\ncts/case1.nii.gz,a\n", "line 3: name 'a' repeats list.csv line 2"),
        ("image\n", "lists no case"),
    ],
)
def test_bad_csv_manifests_name_the_line(data, text, fragment):
    m = data["dir"] / "list.csv"
    m.write_text(text)
    with pytest.raises(InputError, match=None) as err:
        read_manifest(m)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_several_problems_are_counted(data):
    m = data["dir"] / "list.csv"
    m.write_text("image\nx.nii.gz\ny.nii.gz\nz.nii.gz\n")
    with pytest.raises(InputError, match=r"line 2: x.nii.gz does not exist .*\(and 2 more problem\(s\)\)"):
        read_manifest(m)


def test_json_manifests_lists_and_objects(data):
    m = data["dir"] / "list.json"
    m.write_text(json.dumps(["cts/case0.nii.gz", {"image": "cts/case2.nii.gz", "name": "two"}]))
    assert [(Path(s).name, n) for s, n, _ in read_manifest(m)] == [
        ("case0.nii.gz", None),
        ("case2.nii.gz", "two"),
    ]
    m.write_text(json.dumps({"cases": [{"image": "cts/case1.nii.gz", "label": None, "dataset": "x"}]}))
    assert [Path(s).name for s, _, _ in read_manifest(m)] == ["case1.nii.gz"]  # a training manifest qualifies
    m.write_text(json.dumps({"cases": ["cts/case0.nii.gz", {"path": "x"}]}))
    with pytest.raises(InputError, match=r"entry 2 \(cases\[1\]\): expected a path or an object"):
        read_manifest(m)
    m.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(m)


def test_folders_patterns_and_dicom_folders(data, tmp_path):
    cases, from_batch = collect_cases([str(data["cts"])])
    assert [c.name for c in cases] == ["case0", "case1", "case2"] and from_batch
    cases, _ = collect_cases([str(data["cts"] / "case[12].nii.gz")])
    assert [c.name for c in cases] == ["case1", "case2"]
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"x")  # no CT extension: one DICOM input, as before
    cases, from_batch = collect_cases([str(dicom)])
    assert [c.source for c in cases] == [str(dicom)] and not from_batch
    with pytest.raises(InputError, match="matches no CT file"):
        collect_cases([str(tmp_path / "*.nrrd")])


def test_automatic_names_never_take_a_manifest_name(data):
    m = data["dir"] / "named.csv"
    m.write_text("image,name\ncts/case0.nii.gz,case1\n")
    cases, _ = collect_cases([str(m), str(data["cts"] / "case1.nii.gz")])
    assert [c.name for c in cases] == ["case1", "case1_2"]


def test_the_same_ct_from_two_sources_is_refused(data, tmp_path):
    with pytest.raises(InputError, match="given twice"):
        plan_batch([str(data["cts"]), str(data["cts"] / "case0.nii.gz")], tmp_path / "o", BatchSettings())


def test_a_link_out_of_the_output_folder_is_refused(data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "case0")
    with pytest.raises(InputError, match="leads out of the output folder"):
        plan_batch([str(data["cts"] / "case0.nii.gz")], out, BatchSettings())


# -------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prefetch": -1}, "prefetch is -1"),
        ({"prefetch": batch.MAX_PREFETCH + 1}, "prefetch is"),
        ({"prefetch": True}, "prefetch is True"),
        ({"overwrite": "yes"}, "overwrite is 'yes'"),
        ({"pipeline": 1}, "pipeline is 1; it must be True or False"),
        ({"overwrite": None}, "overwrite is None"),
        ({"sample_interval_s": 0}, "sample_interval_s is 0"),
        ({"summary_every_s": float("nan")}, "summary_every_s is nan"),
        ({"summary": "out/"}, "give a file path"),
        ({"formats": "nifti,png"}, "unknown output format 'png'"),
    ],
)
def test_bad_batch_settings_are_refused(kwargs, fragment):
    with pytest.raises(InputError) as err:
        BatchSettings(**kwargs)
    assert fragment in str(err.value)


def test_summary_stem_and_default_place(data, tmp_path):
    assert BatchSettings(summary="x/run.csv").summary == "x/run"
    one = plan_batch([str(data["cts"] / "case0.nii.gz")], tmp_path / "o", BatchSettings())
    assert one.summary is None  # CTs named one by one: no summary unless asked
    folder = plan_batch([str(data["cts"])], tmp_path / "o", BatchSettings())
    assert folder.summary == tmp_path / "o" / "summary"
    ranks = plan_batch([str(data["cts"] / "case0.nii.gz")], tmp_path / "o", BatchSettings(), Ranks(0, 2, 0))
    assert ranks.summary == tmp_path / "o" / "summary"


# ---------------------------------------------------------------------------------------------------- runner
def test_batch_writes_cases_a_summary_and_a_failing_case_fails_only_itself(data, predictor, tmp_path):
    out = tmp_path / "o"
    result, lines = run(
        predictor, [data["cts"], data["broken"]], out, summary=str(tmp_path / "s" / "sum.csv")
    )
    assert [r.status for r in result.records] == ["ok", "ok", "ok", "failed"]
    assert "[4/4]" in lines[-1] and "failed:" in lines[-1]
    rows = list(csv.DictReader(open(tmp_path / "s" / "sum.csv", encoding="utf-8")))
    assert [r["case"] for r in rows] == ["case0", "case1", "case2", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[3]["error"] and "\n" not in rows[3]["error"] and rows[0]["error"] == ""
    assert {f"volume_ml:{c}" for c in CLASSES} <= set(rows[0])
    report = json.loads((out / "case0" / "report.json").read_text())
    assert float(rows[0]["volume_ml:liver"]) == pytest.approx(report["volumes_ml"]["liver"], abs=1e-3)
    assert float(rows[0]["inference_s"]) > 0 and rows[0]["gpu"] == efficiency.NO_GPU
    summary = json.loads((tmp_path / "s" / "sum.json").read_text())
    assert summary["counts"] == {"ok": 3, "failed": 1, "skipped": 0, "not run": 0}
    assert (
        not summary["interrupted"] and summary["cases"][0]["efficiency"]["gpu_peak_mb"] == efficiency.NO_GPU
    )
    eff = report["efficiency"]  # report.json carries the FLARE numbers of the case
    assert set(efficiency.FIELDS) <= set(eff) and eff["gpu"] == "no GPU" and eff["gpu_area_mb_s"] == "no GPU"
    assert (
        eff["cpu_peak_rss_mb"] > 0 and eff["samples"] >= 2 and eff["wall_s"] >= report["timings"]["inference"]
    )
    assert not (out / "broken").exists() and leftovers(out) == []


def test_resume_skips_complete_cases_and_overwrite_redoes_them(data, predictor, tmp_path):
    out = tmp_path / "o"
    run(predictor, [data["cts"]], out)
    before = checksums([out / "case0", out / "case1", out / "case2"])
    shutil.rmtree(out / "case1" / "masks")  # incomplete: redone
    result, lines = run(predictor, [data["cts"]], out)
    assert [r.status for r in result.records] == ["skipped", "skipped", "ok"]
    assert "skipped" in lines[0] and "--overwrite" in lines[0]
    assert checksums([out / "case0"]) == {k: v for k, v in before.items() if "/case0/" in k}
    rows = list(csv.DictReader(open(out / "summary.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == [
        "skipped",
        "ok",
        "skipped",
    ]  # list order, volumes of the old report
    assert rows[0]["volume_ml:liver"] != ""
    result, _ = run(predictor, [data["cts"]], out, overwrite=True)
    assert [r.status for r in result.records] == ["ok", "ok", "ok"]


def test_a_complete_case_made_with_other_settings_is_redone(data, predictor, tmp_path):
    out = tmp_path / "o"
    run(predictor, [data["cts"] / "case0.nii.gz"], out)
    other = predictor.with_settings(classes=("liver",))
    result, _ = run(other, [data["cts"] / "case0.nii.gz"], out)
    assert [r.status for r in result.records] == ["ok"]
    assert json.loads((out / "case0" / "report.json").read_text())["classes"] == ["liver"]
    result, _ = run(other, [data["cts"] / "case0.nii.gz"], out, formats="nifti,seg.nrrd")  # other formats
    assert [r.status for r in result.records] == ["ok"] and (out / "case0" / "segmentation.seg.nrrd").exists()


class Hooked:
    """A Predictor with hooks around ``prepare``, ``run_network`` (``on_infer``) and ``finish`` (everything else
    delegated); ``events`` lists ``(step, case)`` in the order they happened."""

    def __init__(self, inner, on_prepare=None, on_infer=None, on_finish=None):
        self.inner, self.on_prepare, self.on_infer, self.on_finish = inner, on_prepare, on_infer, on_finish
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _event(self, step, name):
        with self._lock:
            self.events.append((step, name))

    def prepare(self, source, progress=None, *, series=None):
        name = Path(source).name.split(".")[0]
        self._event("prepare", name)
        if self.on_prepare:
            self.on_prepare(name)
        return self.inner.prepare(source, progress, series=series)

    def run_network(self, prepared, progress=None):
        name = prepared.volume.name
        self._event("infer", name)
        if self.on_infer:
            self.on_infer(name)
        inferred = self.inner.run_network(prepared, progress)
        self._event("network done", name)
        return inferred

    def finish(self, inferred, progress=None):
        name = inferred.case.volume.name
        self._event("finish", name)
        if self.on_finish:
            self.on_finish(name)
        seg = self.inner.finish(inferred, progress)
        self._event("done", name)
        return seg


def test_prefetch_reads_the_next_case_while_the_current_one_runs(data, predictor, tmp_path):
    second_read = threading.Event()
    hooked = Hooked(predictor, on_prepare=lambda n: n == "case1" and second_read.set())
    overlapped = []
    hooked.on_infer = lambda n: n == "case0" and overlapped.append(second_read.wait(timeout=60))
    result, _ = run(hooked, [data["cts"]], tmp_path / "a", prefetch=1)
    assert overlapped == [True]  # case1 was read while case0 was in the network
    seq = Hooked(predictor)
    run(seq, [data["cts"]], tmp_path / "b", prefetch=0, pipeline=False)
    assert seq.events.index(("prepare", "case1")) > seq.events.index(("done", "case0"))  # one after the other
    for name in ("case0", "case1", "case2"):  # the same results either way
        assert np.array_equal(labels(tmp_path / "a" / name), labels(tmp_path / "b" / name))


def test_prefetch_queue_is_bounded(data, predictor, tmp_path):
    """With prefetch 1, while case0 runs at most 2 more CTs are read (1 queued + 1 waiting to be queued)."""
    cts = tmp_path / "cts"
    cts.mkdir()
    for i in range(5):
        shutil.copy(data["cts"] / "case0.nii.gz", cts / f"c{i}.nii.gz")
    read_while_first = []

    def on_infer(name):
        if name == "c0":
            threading.Event().wait(1.0)  # let the worker run ahead as far as the queue allows
            read_while_first.append(sum(e == "prepare" for e, _ in hooked.events))

    hooked = Hooked(predictor, on_infer=on_infer)
    run(hooked, [cts], tmp_path / "o", prefetch=1)
    assert read_while_first and read_while_first[0] <= 3  # c0 itself, c1 in the queue, c2 being handed over


def test_pipeline_finishes_a_case_while_the_next_one_runs_the_network(data, predictor, tmp_path):
    """pipeline (default): case0's post-processing and writing wait in the worker until case1's network has
    started; without it, case0 is written before case1's network starts. Same files either way."""
    second_network = threading.Event()
    hooked = Hooked(predictor, on_infer=lambda n: n == "case1" and second_network.set())
    waited = []
    hooked.on_finish = lambda n: n == "case0" and waited.append(second_network.wait(timeout=60))
    result, lines = run(hooked, [data["cts"]], tmp_path / "a", prefetch=0, pipeline=True)
    assert waited == [True] and [r.status for r in result.records] == ["ok", "ok", "ok"]
    assert [line.split(":")[0] for line in lines] == [
        f"[{i}/3] {data['cts']}/case{i - 1}.nii.gz" for i in (1, 2, 3)
    ]
    seq = Hooked(predictor)
    run(seq, [data["cts"]], tmp_path / "b", prefetch=0, pipeline=False)
    assert seq.events.index(("infer", "case1")) > seq.events.index(("done", "case0"))
    for name in ("case0", "case1", "case2"):
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert np.array_equal(labels(a), labels(b))
    meta = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert meta["batch"]["pipeline"] is True and meta["elapsed_s"] >= 0


def test_prefetch_and_pipeline_default_to_on_for_an_accelerator_only(data, predictor, tmp_path):
    assert [(s.prefetch, s.pipeline) for s in (BatchSettings().for_device(d) for d in ("cpu", None))] == [
        (0, False),
        (0, False),
    ]
    import torch

    for device in ("cuda", "cuda:3", torch.device("cuda", 1), "mps"):
        assert (BatchSettings().for_device(device).prefetch, BatchSettings().for_device(device).pipeline) == (
            batch.DEFAULT_PREFETCH,
            True,
        )
    given = BatchSettings(prefetch=3, pipeline=False)
    assert (given.for_device("cuda").prefetch, given.for_device("cuda").pipeline) == (3, False)
    assert BatchSettings(pipeline=True).for_device("cpu").pipeline is True
    seq = Hooked(predictor)  # on the CPU, left unset: one after the other
    run(seq, [data["cts"]], tmp_path / "o")
    assert seq.events.index(("prepare", "case1")) > seq.events.index(("done", "case0"))


@pytest.mark.parametrize("pipeline", [True, False])
def test_an_interruption_leaves_whole_cases_and_a_summary_of_what_was_done(
    data, predictor, tmp_path, pipeline
):
    """Ctrl+C in case1's network: case0 (still in the worker with pipeline) is completed whole and counted."""
    in_network = threading.Event()

    def on_infer(name):
        if name == "case1":
            in_network.set()
            raise KeyboardInterrupt

    hooked = Hooked(predictor, on_infer=on_infer)
    hooked.on_finish = lambda n: pipeline and n == "case0" and in_network.wait(timeout=60)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run(hooked, [data["cts"]], out, pipeline=pipeline)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["counts"] == {"ok": 1, "failed": 0, "skipped": 0, "not run": 2}
    assert sorted(p.name for p in out.iterdir()) == ["case0", "summary.csv", "summary.json"]
    assert leftovers(out) == [] and (out / "case0" / "report.json").exists()
    if pipeline:
        assert hooked.events.index(("done", "case0")) > hooked.events.index(("infer", "case1"))


def test_a_failure_after_the_network_fails_only_its_case(data, predictor, tmp_path):
    def on_finish(name):
        if name == "case0":
            raise MemoryError("cannot allocate 3 GiB")

    result, lines = run(Hooked(predictor, on_finish=on_finish), [data["cts"]], tmp_path / "o")
    assert [r.status for r in result.records] == ["failed", "ok", "ok"]
    assert result.records[0].error.startswith("out of memory (cannot allocate 3 GiB)")
    assert not (tmp_path / "o" / "case0").exists() and leftovers(tmp_path / "o") == []


def test_an_unexpected_error_in_the_network_fails_only_its_case(data, predictor, tmp_path):
    def on_infer(name):
        if name == "case1":
            raise RuntimeError("boom\nsecond line")

    result, lines = run(Hooked(predictor, on_infer=on_infer), [data["cts"]], tmp_path / "o")
    assert [r.status for r in result.records] == ["ok", "failed", "ok"]
    assert result.records[1].error == "unexpected RuntimeError: boom"


# ------------------------------------------------------------------------------------------------ efficiency
class FakeGpu:
    name = "fake"

    def __init__(self, values, peak=None):
        self.values, self._peak, self.resets = list(values), peak, 0

    def reset(self):
        self.resets += 1

    def read(self):
        return self.values.pop(0)

    def peak(self):
        return self._peak


def test_memory_time_area_is_the_trapezoid_rule():
    assert efficiency.memory_time_area([0.0, 1.0, 3.0], [0.0, 100.0, 100.0]) == pytest.approx(250.0)
    assert efficiency.memory_time_area([5.0], [42.0]) == 0.0
    with pytest.raises(ValueError):
        efficiency.memory_time_area([0.0, 1.0], [1.0])


def test_sampler_on_a_fake_clock_and_gpu():
    ticks = iter([10.0, 10.0, 10.1, 10.2, 10.4, 10.4])  # start, 4 samples, stop
    gpu = FakeGpu([100.0, 300.0, 300.0, 100.0], peak=350.0)
    s = efficiency.EfficiencySampler(
        "cuda:0", clock=ticks.__next__, probe=gpu, rss=lambda: 512.0, extra_wall_s=2.0
    )
    s.start(thread=False)
    s.sample()
    s.sample()
    e = s.stop()
    assert gpu.resets == 1 and e.samples == 4
    assert e.gpu_area_mb_s == pytest.approx(0.1 * 200 + 0.1 * 300 + 0.2 * 200)  # 90 MB·s
    assert e.gpu_peak_mb == 350.0  # torch's own peak between samples counts
    assert e.wall_s == pytest.approx(2.4) and e.cpu_peak_rss_mb == 512.0
    assert e.to_dict()["gpu"] == "fake" and e.to_dict()["gpu_area_mb_s"] == 90.0


def test_gpu_numbers_end_with_the_network_when_cases_overlap():
    """end_gpu(): the peak and the area stop at that moment (the next case's memory is not counted); the wall time
    and RSS go on to stop()."""
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 4.0]).__next__
    gpu = FakeGpu([100.0, 300.0, 9999.0], peak=350.0)
    s = efficiency.EfficiencySampler("cuda", probe=gpu, clock=clock, rss=lambda: 10.0).start(thread=False)
    s.sample()  # t=1: 300 MB
    s.end_gpu()  # t=2: the 3rd reading would be 9999 → taken here, so the peak is 9999 (still this case's)
    gpu._peak = 20000.0  # the next case's network: not this case's
    s.sample()  # t=3: RSS only
    e = s.stop()  # t=4
    assert gpu.values == [] and e.gpu_peak_mb == 9999.0 and e.wall_s == 4.0 and e.samples == 5
    assert e.gpu_area_mb_s == efficiency.memory_time_area([0.0, 1.0, 2.0], [100.0, 300.0, 9999.0])
    s.end_gpu()  # a second call changes nothing
    assert s.summary().gpu_peak_mb == 9999.0


def test_a_summary_before_stop_covers_the_span_up_to_now():
    """report.json is written while the sampler still runs: its numbers must reach the end of the segmentation,
    whether or not the background thread has woken up yet (no dependence on the machine's speed)."""
    ticks = iter([0.0, 0.0, 0.7, 0.7])  # start: wall clock, sample; summary: sample, wall clock
    gpu = FakeGpu([100.0, 500.0])
    s = efficiency.EfficiencySampler("cuda:0", clock=ticks.__next__, probe=gpu, rss=lambda: 1.0)
    e = s.start(thread=False).summary()
    assert e.samples == 2 and e.gpu_peak_mb == 500.0
    assert e.gpu_area_mb_s == pytest.approx(0.7 * 300.0) and e.wall_s == pytest.approx(0.7)


def test_without_a_gpu_the_gpu_fields_say_no_gpu():
    assert efficiency.gpu_probe("cpu") is None and efficiency.gpu_probe(None) is None
    d = efficiency.EfficiencySampler("cpu", interval_s=0.01).start().stop().to_dict()
    assert (d["gpu"], d["gpu_peak_mb"], d["gpu_area_mb_s"]) == ("no GPU", "no GPU", "no GPU")
    assert d["samples"] >= 2 and d["cpu_peak_rss_mb"] > 0 and d["process_peak_rss_mb"] >= d["cpu_peak_rss_mb"]
    with pytest.raises(InputError, match="interval_s"):
        efficiency.EfficiencySampler("cpu", interval_s=-1)


def test_the_background_thread_samples_until_stopped():
    gpu = FakeGpu([float(i) for i in range(100000)])
    s = efficiency.EfficiencySampler("cuda", interval_s=0.001, probe=gpu, rss=lambda: 1.0).start()
    while len(s.times) < 5:  # the thread keeps sampling on its own
        threading.Event().wait(0.01)
    e = s.stop()
    assert e.samples >= 6 and e.gpu_peak_mb == max(s.gpu_mb)


# ------------------------------------------------------------------------------------------------------ ranks
def test_ranks_from_torchrun_and_slurm_variables():
    assert distributed.detect({}) == Ranks()
    assert distributed.detect(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_NTASKS": "8"}
    ) == Ranks(1, 2, 1, "torchrun")
    assert distributed.detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}).world == 8
    with pytest.raises(InputError, match="not a whole number"):
        distributed.detect({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="not a valid placement"):
        distributed.detect({"RANK": "2", "WORLD_SIZE": "2"})


def test_each_case_goes_to_exactly_one_rank():
    items = list(range(11))
    shares = [Ranks(r, 3, 0).mine(items) for r in range(3)]
    assert sorted(sum(shares, [])) == items and max(map(len, shares)) - min(map(len, shares)) <= 1
    assert distributed.device_for(Ranks(1, 2, 1), "cpu") == "cpu"
    assert distributed.device_for(Ranks(), None) is None
    assert not distributed.init(Ranks(), "cpu")  # one rank: nothing started


def test_rank_summaries_are_merged_in_list_order(data, predictor, tmp_path):
    out = tmp_path / "o"
    cases, _ = collect_cases([str(data["cts"])])
    for rank in (1, 0):  # each rank runs its share and writes its part (no process group: barrier is a no-op)
        plan = BatchPlan(tuple(cases), out, BatchSettings(), Ranks(rank, 2, 0), out / "summary")
        runner = BatchRunner(predictor, plan, echo=lambda *a, **k: None)
        runner._merge_after_barrier = lambda result: None  # merged below, once both parts exist
        runner.run()
    assert sorted(p.name for p in out.glob("summary.rank*")) == [
        "summary.rank0of2.json",
        "summary.rank1of2.json",
    ]
    batch.merge_summaries(out / "summary", 2, len(cases))
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["case0", "case1", "case2"]
    assert [c["rank"] for c in summary["cases"]] == [0, 1, 0] and summary["missing_ranks"] == []
    assert not list(out.glob("summary.rank*"))


def test_an_interrupted_run_of_two_ranks_is_merged_by_the_rerun(data, predictor, tmp_path):
    """Rank 1 interrupted in its only case (rank 0 done): two parts, no merged summary, and a line that says how
    to go on; the rerun skips rank 0's cases, runs rank 1's, merges everything and removes every part (also a
    stale one of an earlier 3-rank run)."""
    out = tmp_path / "o"
    cases, _ = collect_cases([str(data["cts"])])

    def run_rank(rank, pred):
        lines = []
        plan = BatchPlan(tuple(cases), out, BatchSettings(), Ranks(rank, 2, 0), out / "summary")
        runner = BatchRunner(pred, plan, echo=lambda line, error=False: lines.append(line))
        runner._merge_after_barrier = lambda result: None  # merged below, as rank 0 does after the barrier
        runner.run()
        return lines

    def stop(name):
        raise KeyboardInterrupt

    run_rank(0, predictor)
    with pytest.raises(KeyboardInterrupt):
        run_rank(1, Hooked(predictor, on_infer=stop))
    part1 = json.loads((out / "summary.rank1of2.json").read_text())
    assert part1["interrupted"] and part1["cases"] == [] and not (out / "summary.json").exists()
    (out / "summary.rank0of3.json").write_text("{}")  # left by an earlier run with 3 ranks
    lines = run_rank(1, predictor) + run_rank(0, predictor)
    assert (
        sum("skipped" in line for line in lines) == 2 and sum("classes found" in line for line in lines) == 1
    )
    batch.merge_summaries(out / "summary", 2, len(cases))
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["counts"] == {"ok": 1, "failed": 0, "skipped": 2, "not run": 0} and not summary["interrupted"]
    )
    assert [c["case"] for c in summary["cases"]] == ["case0", "case1", "case2"]
    assert not list(out.glob("summary.rank*"))


def test_the_interruption_says_how_to_go_on(data, predictor, tmp_path):
    """A note on the KeyboardInterrupt (the CLI's one line ends with it), for several cases or ranks only."""
    hooked = Hooked(predictor, on_infer=lambda name: (_ for _ in ()).throw(KeyboardInterrupt()))
    plan = plan_batch([str(data["cts"])], tmp_path / "o", BatchSettings(), Ranks(1, 2, 1))
    with pytest.raises(KeyboardInterrupt) as info:
        BatchRunner(hooked, plan, echo=lambda line, error=False: None).run()
    assert info.value.__notes__ == [
        "[rank 1/2] 0 of 1 cases done; run the same command again to resume (complete cases are skipped); this "
        f"rank's summary is {tmp_path / 'o' / 'summary'}.rank1of2.json, merged by the rerun"
    ]
    plan = plan_batch([str(data["cts"])], tmp_path / "p", BatchSettings())
    with pytest.raises(KeyboardInterrupt) as info:
        BatchRunner(hooked, plan, echo=lambda line, error=False: None).run()
    assert info.value.__notes__ == [
        "0 of 3 cases done; run the same command again to resume (complete cases are skipped)"
    ]
    one = plan_batch([str(data["cts"] / "case0.nii.gz")], tmp_path / "q", BatchSettings())
    with pytest.raises(KeyboardInterrupt) as info:
        BatchRunner(hooked, one, echo=lambda line, error=False: None).run()
    assert not hasattr(info.value, "__notes__")  # one CT: just "interrupted"


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_batch_options(data, tmp_path, capsys):
    base = ["segment", "--classes", "liver", "--weights", str(data["weights"]), "--device", "cpu"]
    assert cli.main([*base, str(data["cts"]), "-o", str(tmp_path / "o"), "--prefetch", "99"]) == 2
    assert "prefetch is 99" in capsys.readouterr().err and not (tmp_path / "o").exists()
    m = data["dir"] / "two.csv"
    m.write_text("image,name\ncts/case0.nii.gz,alpha\ncts/case2.nii.gz,beta\n")
    out, summary = tmp_path / "o", tmp_path / "reports" / "run1"
    assert cli.main([*base, str(m), "-o", str(out), "--summary", str(summary), "--prefetch", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta"]
    assert [r["case"] for r in csv.DictReader(open(f"{summary}.csv", encoding="utf-8"))] == ["alpha", "beta"]
    capsys.readouterr()
    assert cli.main([*base, str(m), "-o", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert cli.main([*base, str(m), "-o", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.count("classes found") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 2  # a manifest: a summary by default
    assert (summary["batch"]["prefetch"], summary["batch"]["pipeline"]) == (0, False)  # the CPU's defaults
    assert cli.main([*base, str(m), "-o", str(out), "--overwrite", "--pipeline", "--prefetch", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["batch"] == {
        "overwrite": True, "prefetch": 2, "pipeline": True, "formats": None, "series": None,
    }  # fmt: skip
    capsys.readouterr()
    assert (
        cli.main([*base, str(m), "-o", str(out), "--format", "nifti,seg.nrrd"]) == 0
    )  # --format reaches save
    assert (out / "beta" / "segmentation.seg.nrrd").exists() and capsys.readouterr().out.count(
        "classes found"
    ) == 2


# -------------------------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_outputs(data, shared_data, tmp_path):
    """``torchrun --nproc_per_node 2`` over 4 phantoms and a real CT: the same label maps voxel for voxel as one
    process, every case once, the merged summary complete."""
    cts = tmp_path / "cts"
    cts.mkdir()
    for i in range(4):
        shutil.copy(data["cts"] / f"case{i % 3}.nii.gz", cts / f"p{i}.nii.gz")
    shutil.copy(shared_data / "ts_abdomen_3mm" / "ct.nii.gz", cts / "abdomen.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = [
        "segment",
        str(cts),
        "--weights",
        "builtin",
        "--fast",
        "--device",
        "cpu",
        "--classes",
        "liver",
        "spleen",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "universal.cli", *common, "-o", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "universal.cli", *common, "-o", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    names = ["abdomen", "p0", "p1", "p2", "p3"]
    for name in names:
        assert np.array_equal(labels(tmp_path / "one" / name), labels(tmp_path / "two" / name)), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == names  # each once, in list order
    assert sorted(c["rank"] for c in summary["cases"]) == [0, 0, 0, 1, 1]
    assert (
        summary["counts"] == {"ok": 5, "failed": 0, "skipped": 0, "not run": 0} and summary["world_size"] == 2
    )
    assert sum("classes found" in line for line in two.stdout.splitlines()) == 5
    assert not list((tmp_path / "two").glob("summary.rank*")) and leftovers(tmp_path / "two") == []


@pytest.mark.slow
def test_two_slurm_tasks_find_each_other_from_the_node_list_and_job_id(data, tmp_path):
    """Two processes with only Slurm's variables (``srun -n 2`` without MASTER_ADDR/MASTER_PORT): the rendezvous is
    derived (first host of SLURM_JOB_NODELIST, port from SLURM_JOB_ID), gloo starts, the outputs equal a single
    process's and rank 0 merges the summary."""
    import socket

    for port in range(15000 + os.getpid() % 16000, 32000):  # a free port the job id maps to
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
    common = [
        "-m",
        "universal.cli",
        "segment",
        str(data["cts"]),
        "--weights",
        str(data["weights"]),
        "--device",
        "cpu",
    ]
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_ID=str(port - 15000))  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, *common, "-o", str(tmp_path / "two")],
            env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert cli.main([*common[2:], "-o", str(tmp_path / "one")]) == 0
    for name in ("case0", "case1", "case2"):
        assert np.array_equal(labels(tmp_path / "one" / name), labels(tmp_path / "two" / name)), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [c["rank"] for c in summary["cases"]] == [0, 1, 0] and summary["world_size"] == 2
    assert summary["counts"]["ok"] == 3 and not list((tmp_path / "two").glob("summary.rank*"))


def test_dashboard_runs_carry_the_efficiency_numbers(predictor):
    from types import SimpleNamespace

    from universal import dashboard

    ph = universal.make_phantom((40, 40, 32), spacing=(4.0, 4.0, 4.0))

    class Base:
        model = predictor.model

        def with_settings(self, **changes):
            return predictor

    settings = SimpleNamespace(classes=("liver",), fast=False, template=None, precision=None)
    run = dashboard.segment(Base(), ph.volume, settings, "sample:phantom", model_seconds=2.5)
    eff = run.seg.info["efficiency"]
    assert eff["gpu"] == "no GPU" and eff["wall_s"] >= 2.5  # the app's model load counts, as in FLARE
    table = dict(dashboard.efficiency_table(run).itertuples(index=False))
    assert table["peak GPU memory"] == "no GPU" and table["GPU memory-time area"] == "no GPU"
    assert table["wall time (with model load)"].endswith(" s") and table["peak CPU memory (RSS)"].endswith(
        "MB"
    )


def test_nvml_reading_takes_this_process_else_the_device(monkeypatch):
    from types import SimpleNamespace

    class FakeNvml:
        class NVMLError(Exception):
            pass

        procs: list = []

        def nvmlInit(self):  # noqa: N802 - NVML's names
            pass

        def nvmlDeviceGetComputeRunningProcesses(self, handle):  # noqa: N802
            return self.procs

        def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
            return SimpleNamespace(used=3 * 2**30)

    nvml = FakeNvml()
    monkeypatch.setattr(efficiency, "_nvml_handle", lambda pynvml, device: "handle")
    probe = efficiency._NvmlProbe(nvml, "cuda:0")
    assert probe.read() == 3 * 1024 and probe.name == "nvml (device)"  # NVML does not list this process
    nvml.procs = [
        SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=2**30),
        SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**29),
    ]
    assert probe.read() == 512 and probe.name == "nvml (process)" and probe.peak() is None


def test_several_ranks_without_a_rendezvous_address_is_one_line(data, tmp_path, capsys, monkeypatch):
    for var, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *SLURM_JOB_VARIABLES):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "o"
    argv = ["segment", str(data["cts"]), "-o", str(out), "--weights", str(data["weights"]), "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: MASTER_ADDR and MASTER_PORT not set for a run of several ranks")
        and "\n" not in err
    )
    assert not out.exists()  # the output folder it created is removed again
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[0a-2]")  # a malformed list: one line too
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read the first host of the Slurm node list 'gpu[0a-2]'" in err and "\n" not in err


SLURM_JOB_VARIABLES = (
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_JOBID",
)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[03-05,09],login1", "gpu03"),
        ("node7", "node7"),
        ("node7,node8", "node7"),
        ("rack[2-3]-n[009-012]", "rack2-n009"),
        ("  c[1]  ", "c1"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


@pytest.mark.parametrize(
    "nodelist", ["", "gpu[", "gpu[]", "gpu[a-b]", "gpu[1-2", "gpu]1[", "gpu[[1]]", ",n1"]
)
def test_bad_slurm_node_lists_are_refused(nodelist):
    with pytest.raises(InputError, match="export MASTER_ADDR"):
        distributed.first_host(nodelist)


def test_rendezvous_prefers_the_environment_then_derives_it_from_slurm():
    slurm = {"SLURM_JOB_NODELIST": "gpu[03-05]", "SLURM_JOB_ID": "123456"}
    assert distributed.rendezvous(slurm) == {
        "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(15000 + 123456 % 17000),
    }
    given = {**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    assert distributed.rendezvous(given) == {"MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    assert distributed.rendezvous({"SLURM_NODELIST": "a1,a2", "SLURM_JOBID": "7"})["MASTER_ADDR"] == "a1"
    assert distributed.rendezvous({**slurm, "MASTER_PORT": "2"})["MASTER_ADDR"] == "gpu03"  # each alone
    with pytest.raises(InputError, match="MASTER_PORT not set"):
        distributed.rendezvous({"SLURM_JOB_NODELIST": "gpu1"})
    with pytest.raises(InputError, match="SLURM_JOB_ID='x1' is not a whole number"):
        distributed.rendezvous({"SLURM_JOB_NODELIST": "gpu1", "SLURM_JOB_ID": "x1"})
    ports = {
        distributed.rendezvous({**slurm, "SLURM_JOB_ID": str(j)})["MASTER_PORT"] for j in range(0, 10**6, 997)
    }
    assert all(15000 <= int(p) < 32000 for p in ports)  # unprivileged and below the ephemeral range


ON_MAIN_FIRST = """
import sys
from universal import distributed
from universal.errors import CheckpointError, InputError
rank, fail = int(sys.argv[1]), sys.argv[2] == "fail"
ranks = distributed.Ranks(rank, 2, rank, "torchrun")
distributed.init(ranks, "cpu")
calls = []
def fn():
    calls.append(rank)
    if fail:
        raise CheckpointError("the weights file changed on disk")
    return "path/to/weights.pt"
try:
    print("VALUE", distributed.on_main_first(ranks, fn), calls)
except (InputError, CheckpointError) as exc:
    print("ERROR", type(exc).__name__, exc, calls)
distributed.barrier(ranks)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_on_main_first_runs_once_on_rank_0_and_tells_the_others(tmp_path, fail):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    script = tmp_path / "main_first.py"
    script.write_text(ON_MAIN_FIRST)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "fail" if fail else "ok"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    if fail:
        assert outs == [
            "ERROR CheckpointError the weights file changed on disk [0]",
            "ERROR InputError rank 0 stopped: the weights file changed on disk []",
        ]
    else:
        assert outs == ["VALUE path/to/weights.pt [0]", "VALUE None []"]  # fn ran on rank 0 only
