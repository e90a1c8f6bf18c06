"""bench/gpu_suite.py on a CPU: its --cpu-smoke run of every benchmark, the JSON and markdown it
writes, and what it does with a benchmark that fails, overruns its limit or comes after the deadline."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture
def gpu_suite(monkeypatch):
    """bench/gpu_suite.py as a module, with bench/ importable as when it runs as a script."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_suite

    return gpu_suite


FAKE_BENCHMARKS = {
    "fake_broken": """
        def parse_args(argv):
            return argv

        def run(args):
            yield {"setting": "first", "images_per_s": 1.5}
            raise RuntimeError("no kernel for this shape")
    """,
    "fake_slow": """
        import time

        def parse_args(argv):
            return argv

        def run(args):
            yield {"setting": "first", "images_per_s": 2.0}
            time.sleep(60)
            yield {"setting": "second", "images_per_s": 3.0}
    """,
    "fake_fine": """
        def parse_args(argv):
            return argv

        def run(args):
            return {"seconds_to_checkpoint": 0.5, "argv": args}
    """,
}


@pytest.fixture
def fake_benchmarks(gpu_suite, tmp_path, monkeypatch) -> list:
    """A benchmark that fails after one setting, one that overruns its 1 s limit after one, one that works."""
    for name, source in FAKE_BENCHMARKS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    columns = ("setting", "images_per_s")
    return [
        gpu_suite.Benchmark("fake_broken", "nothing", gpu=[], smoke=[], seconds=60, columns=columns),
        gpu_suite.Benchmark("fake_slow", "nothing", gpu=[], smoke=[], seconds=1, columns=columns),
        gpu_suite.Benchmark("fake_fine", "nothing", gpu=["--out", gpu_suite.WORK], smoke=[], seconds=60),
    ]


def test_a_failing_or_overrunning_benchmark_is_recorded_with_what_it_measured_and_the_suite_goes_on(
    gpu_suite, fake_benchmarks, tmp_path
):
    written = []  # the suite writes its JSON after every benchmark: a session cut short keeps what was measured
    broken, slow, fine = gpu_suite.run_suite(fake_benchmarks, cpu_smoke=False, deadline_s=60, work=tmp_path / "work",
                                             after_each=lambda entries: written.append([e["status"] for e in entries]))
    assert written == [["error"], ["error", "error"], ["error", "error", "ok"]]
    assert broken["status"] == "error" and broken["error"] == "RuntimeError: no kernel for this shape"
    assert "RuntimeError" in broken["traceback"]
    assert broken["records"] == [{"setting": "first", "images_per_s": 1.5}]
    assert slow["status"] == "error" and slow["error"] == "stopped at its limit of 1 s"
    assert slow["records"] == [{"setting": "first", "images_per_s": 2.0}]
    scratch = tmp_path / "work" / "fake_fine"
    assert fine["status"] == "ok" and fine["records"] == [{"seconds_to_checkpoint": 0.5, "argv": ["--out", str(scratch)]}]
    assert fine["command"] == f"python bench/fake_fine.py --out {scratch}"
    assert not scratch.exists()  # its scratch directory is gone


def test_benchmarks_after_the_deadline_are_skipped_with_the_reason(gpu_suite, fake_benchmarks, tmp_path):
    entries = gpu_suite.run_suite(fake_benchmarks, cpu_smoke=False, deadline_s=0, work=tmp_path / "work")
    assert [entry["status"] for entry in entries] == ["skipped"] * 3
    assert entries[0]["reason"] == "the suite's deadline of 0 s had passed"


def test_the_markdown_has_a_table_per_benchmark_and_says_what_failed_or_was_skipped(gpu_suite, fake_benchmarks, tmp_path):
    entries = gpu_suite.run_suite(fake_benchmarks, cpu_smoke=False, deadline_s=60, work=tmp_path / "work")
    entries.append({"name": "fake_late", "reference": "nothing", "columns": [], "status": "skipped", "reason": "the deadline",
                    "records": []})
    report = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-02T10:00:00+00:00", "torch": "2.14.1", "cuda": "13.0",
              "command": "python bench/gpu_suite.py --out x", "seconds": 61.0, "benchmarks": entries}
    markdown = gpu_suite.markdown(report)
    assert markdown.startswith("### GPU suite: NVIDIA H100 80GB HBM3, 2026-12-02, torch 2.14.1 (CUDA 13.0)\n")
    assert "Error: RuntimeError: no kernel for this shape\n\n| setting | images_per_s |\n|---|---|\n| first | 1.5 |\n" in markdown
    assert "| quantity | value |\n|---|---|\n| seconds_to_checkpoint | 0.5 |" in markdown
    assert "**fake_late**\nreference in the same run: nothing.\n\nSkipped: the deadline." in markdown


def test_eval_speed_projects_fid_30k_from_the_guided_sampling_speed_of_the_same_run(gpu_suite, tmp_path):
    benchmarks = {benchmark.name: benchmark for benchmark in gpu_suite.BENCHMARKS}
    assert "tessera+cfg" in benchmarks["sampling_speed"].gpu
    measured = {"sampling_speed": [{"bench": "sampling_speed"}, {"setting": "tessera", "images_per_s": 90.0},
                                   {"setting": "tessera+cfg", "images_per_s": 45.5}]}
    argv = gpu_suite.arguments(benchmarks["eval_speed"], cpu_smoke=False, work=tmp_path, measured=measured)
    assert argv[-2:] == ["--sampling-images-per-s", "45.5"]
    assert "--sampling-images-per-s" not in gpu_suite.arguments(benchmarks["eval_speed"], False, tmp_path, {})


# the smoke run in two parts: the benchmarks that run in this process, and the two that start
# `tessera fit` processes (about 10 s of imports each on two cores, three of them)
IN_PROCESS = ["prior_throughput", "memory_estimate", "sampling_speed", "tokenizer_throughput", "host_syncs",
              "eval_speed", "multiscale_shapes", "data_throughput", "compression_shapes"]
LAUNCHING_FITS = ["requeue_cost", "shapes_tokenizer", "families_shapes"]


def test_the_suite_and_its_smoke_tests_cover_every_script_of_bench(gpu_suite):
    scripts = sorted(path.stem for path in (REPO / "bench").glob("*.py") if path.stem != "gpu_suite")
    assert sorted(benchmark.name for benchmark in gpu_suite.BENCHMARKS) == scripts
    assert sorted(IN_PROCESS + LAUNCHING_FITS) == scripts


@pytest.mark.parametrize(
    "names", [IN_PROCESS, pytest.param(LAUNCHING_FITS, marks=pytest.mark.slow)], ids=["in_process", "launching_fits"]
)
def test_cpu_smoke_runs_the_benchmarks_and_writes_the_json_and_the_rows(gpu_suite, names, tmp_path, capsys):
    assert gpu_suite.main(["--cpu-smoke", "--only", *names, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert {"device", "torch", "cuda", "date", "command", "mode", "seconds", "benchmarks"} <= report.keys()
    assert report["device"] == "cpu" and report["mode"] == "cpu-smoke"
    assert report["command"] == f"python bench/gpu_suite.py --cpu-smoke --only {' '.join(names)} --out {tmp_path}"
    assert [entry["name"] for entry in report["benchmarks"]] == names
    for entry in report["benchmarks"]:
        assert entry["status"] == "ok", entry.get("traceback")
        assert entry["command"].startswith(f"python bench/{entry['name']}.py ") and entry["reference"]
        row, number = entry["columns"][:2] or (None, None)
        rows = [record for record in entry["records"] if row in record] if row else entry["records"]
        assert rows and all(number is None or isinstance(record[number], (int, float)) for record in rows), entry
    assert not (tmp_path / "work").exists()

    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert markdown in capsys.readouterr().out
    assert [line for line in markdown.splitlines() if line.startswith("**")] == [
        f"**{entry['name']}**: `{entry['command']}`" for entry in report["benchmarks"]
    ]
