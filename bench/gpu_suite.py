"""Every benchmark of bench/ in one process, at reduced sizes, on the first GPU at hand: one JSON
with each benchmark's numbers (or its error) and the markdown rows for BENCHMARKS.md.

Each script runs through its own `parse_args(argv)` and `run(args)` with the arguments in
`BENCHMARKS`: fewer steps, repeats or images than its defaults, and the settings that answer its
goal, its reference among them (every script's full run remains its own command). Each
benchmark's entry holds the equivalent command line. What is measured is fixed by those
arguments; time only bounds the run, for 9 minutes of a GPU machine with `pytest -m gpu` first:
  - a benchmark still running at its `seconds` (about twice what it should take), or at the
    suite's deadline, is stopped and recorded as an error, keeping the settings it finished
    (the scripts yield a record per setting);
  - no benchmark starts after `--deadline-s` (360); the remaining ones are recorded as skipped,
    and `--only NAME ...` runs them in a later run.
The GPU benchmarks come first; data_throughput, shapes_tokenizer, compression_shapes and
families_shapes measure the CPU and come last. A benchmark that fails is recorded with its error
and the suite goes on. The JSON and the markdown are rewritten after every benchmark.

    python bench/gpu_suite.py --out gpu_suite                      # -> gpu_suite/gpu_suite.json, .md
    python bench/gpu_suite.py --out gpu_suite --only data_throughput shapes_tokenizer
    python bench/gpu_suite.py --cpu-smoke --out /tmp/suite          # tiny sizes on a CPU: the code path only

--cpu-smoke runs every script's tiny CPU mode; its numbers mean nothing. The benchmarks are
imported one at a time, so a missing optional package (open_clip for eval_speed, webdataset for
data_throughput) fails that benchmark alone.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
WORK = "{work}"  # in an argument list: the benchmark's own scratch directory, deleted after it
IN_REPO = "{repo}/"  # in an argument: a path in this checkout, whatever the working directory


@dataclass
class Benchmark:
    """One script of bench/ as the suite runs it."""

    name: str
    """The script, bench/NAME.py, and its module."""
    reference: str
    """What it is measured against in the same run."""
    gpu: list[str]
    """Its arguments on a GPU: reduced sizes, and the settings its goal needs, its reference among them."""
    smoke: list[str]
    """Its arguments with --cpu-smoke: its tiny CPU mode and the fewest settings."""
    seconds: int
    """Its time limit on a GPU, about twice what it should take: past it, it is stopped and recorded as an error."""
    columns: tuple[str, ...] = ()
    """Record fields of its markdown table, the first naming the row; () for a report of key-value pairs."""


BENCHMARKS = [
    Benchmark(
        "prior_throughput",
        "transformers GPT-2 of the same shape, eager and compiled (settings gpt2, gpt2+compile); "
        "unsharded against FSDP2 (tessera, tessera+fsdp2); the LLM backbone family's step on a Llama of the same size (llama)",
        # eager, then compiled as TextImagePrior(compile=True) trains; the whole-loss compile is left to
        # the full run; FSDP2's cost in time and memory beside the eager row
        gpu=["--batch-size", "64", "--warmup", "2", "--steps", "5",
             "--settings", "tessera", "tessera+fsdp2", "gpt2", "tessera+compile-blocks-heads", "gpt2+compile", "llama"],
        smoke=["--tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--settings", "tessera", "tessera+fsdp2", "gpt2", "llama"],
        seconds=200,
        columns=("setting", "tokens_per_s", "mfu", "ms_per_step", "peak_memory_gib", "loss"),
    ),
    Benchmark(
        "memory_estimate",
        "the peak prior_throughput measured above for the same prior and batch on one GPU (setting tessera; "
        "without DDP's gradient buckets, 4 bytes a parameter fewer than the estimate counts)",
        gpu=[f"{IN_REPO}configs/prior/300m.yaml", f"{IN_REPO}configs/trainer/ddp.yaml", "--batch-size", "64"],
        smoke=[f"{IN_REPO}configs/prior/tiny_shapes.yaml", f"{IN_REPO}configs/trainer/ddp.yaml"],
        seconds=30,
    ),
    Benchmark(
        "sampling_speed",
        "transformers GPT-2 generate with a static cache (compiled by transformers) and a dynamic one "
        "(settings gpt2+static, gpt2+dynamic); our cacheless loop (tessera-nocache); the LLM backbone family's "
        "sampling on a Llama of the same size (llama, llama+cfg against tessera, tessera+cfg)",
        # the goal's three comparisons, and eager guidance for eval_speed's projection; compiled
        # guidance and GPT-2 without a cache are left to the full run
        gpu=["--batch-size", "64", "--warmup", "1", "--repeats", "1", "--nocache-steps", "8",
             "--settings", "tessera", "tessera-nocache", "tessera+cfg", "gpt2+dynamic", "tessera+compile", "gpt2+static", "rq",
             "llama", "llama+cfg"],
        smoke=["--tiny", "--device", "cpu", "--warmup", "0", "--settings", "tessera", "tessera-nocache", "gpt2+dynamic", "rq", "llama"],
        seconds=200,
        columns=("setting", "images_per_s", "ms_per_token_step", "seconds_per_batch", "cudagraph_skips"),
    ),
    Benchmark(
        "tokenizer_throughput",
        "the same networks in taming-transformers' recipe: fp32, BatchNorm PatchGAN, eager (setting reference)",
        gpu=["--batch-size", "16", "--warmup", "3", "--steps", "5"],
        smoke=["--tiny", "--device", "cpu", "--batch-size", "2", "--warmup", "1", "--steps", "1", "--settings", "reference"],
        seconds=200,
        columns=("setting", "images_per_s", "ms_per_step", "peak_memory_gib"),
    ),
    Benchmark(
        "host_syncs",
        "the design: 2 syncs a step (the non-finite guard, Lightning's progress-bar read-back of the loss)",
        gpu=["--warmup", "2", "--steps", "3"],
        smoke=["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--settings", "prior", "tokenizer-vq"],
        seconds=120,
        columns=("setting", "syncs_per_step", "designed", "measured_steps", "sites"),
    ),
    Benchmark(
        "eval_speed",
        "the reference Inception rate: ~4.5k images/s with TF32 on one H100, ~2.2k in fp32; FID-30K goal 10 minutes",
        gpu=["--batch-size", "250", "--repeats", "3", "--read-back-images", "500", "--workers", "8"],
        smoke=["--tiny", "--device", "cpu", "--clip-model", "ViT-S-32"],
        seconds=90,
    ),
    Benchmark(
        "requeue_cost",
        "a cold start of the same command, without a checkpoint (cold_start_to_first_step_s)",
        gpu=["--batch-size", "16", "--signal-step", "3", "--steps-after", "2", "--out", WORK],
        smoke=["--tiny", "--batch-size", "2", "--signal-step", "1", "--steps-after", "1", "--out", WORK],
        seconds=150,
    ),
    Benchmark(
        "multiscale_shapes",
        "the prior's own coarse sampling in the same run: the fine stage's share of sampling time "
        "(random-init networks of the tiny multi-scale configs)",
        gpu=["--tiny", "--device", "cuda", "--scenes", "64", "--batch-size", "64"],
        smoke=["--tiny", "--scenes", "4", "--batch-size", "2", "--repeats", "1"],
        seconds=60,
    ),
    Benchmark(
        "data_throughput",
        "webdataset's documented pipeline with torchvision transforms (pipeline webdataset+torchvision)",
        gpu=["--images", "1024", "--workers", "1", "2", "4", "--data", WORK],
        smoke=["--images", "16", "--workers", "1", "--batch-size", "4", "--data", WORK],
        seconds=90,
        columns=("pipeline", "workers", "images_per_s", "per_worker"),
    ),
    Benchmark(
        "shapes_tokenizer",
        "none: the quickstart's tokenizer (CPU) at a step budget",
        gpu=["--seconds", "120", "--samples", "1024", "--", "--trainer.max_steps=100"],
        smoke=["--seconds", "60", "--samples", "64", "--threads", "1", "--", "--trainer.max_steps=2"],
        seconds=120,
    ),
    Benchmark(
        "compression_shapes",
        "PNG, lossless WebP and JPEG XL (with the bench extra), zlib and LZMA2 of the same renders, and "
        "-log2 p against the range coder's words (CPU)",
        gpu=["--images", "100", "--coder-symbols", "4096"],
        smoke=["--images", "2", "--image-size", "32", "--coder-symbols", "64"],
        seconds=120,
        columns=("coder", "bits_per_subpixel", "bytes"),
    ),
    Benchmark(
        "families_shapes",
        "the flat prior (family flat) trained the same steps on the same data in the same run (CPU; "
        "a short run here: the code path and the speeds, not the fidelity of the full one)",
        gpu=["--out", WORK, "--families", "flat", "rq", "--tokenizer-steps", "50", "--prior-steps", "50",
             "--num-samples", "1024", "--fidelity-samples", "16", "--repeats", "1"],
        # the multi-scale family: tokenizer, fine stage and prior, every kind of stage there is
        smoke=["--out", WORK, "--families", "multiscale", "--tokenizer-steps", "1", "--prior-steps", "1",
               "--num-samples", "64", "--fidelity-samples", "2", "--repeats", "1"],
        seconds=240,
        columns=("family", "images_per_second", "speed_vs_flat", "seen_color_and_shape", "val_bits_per_image"),
    ),
]


class BenchmarkTimeout(BaseException):
    """Raised by the alarm in the middle of a benchmark: a BaseException, as KeyboardInterrupt, so that
    no `except Exception` on the way (a data pipeline's skip-and-continue handler, say) swallows it."""


def _expire(signum, frame):
    raise BenchmarkTimeout


def arguments(benchmark: Benchmark, cpu_smoke: bool, work: Path, measured: dict[str, list[dict]]) -> list[str]:
    """The benchmark's argument list for this run, its scratch directory filled in."""
    argv = [str(work) if arg == WORK else arg.replace(IN_REPO, f"{REPO}/")
            for arg in (benchmark.smoke if cpu_smoke else benchmark.gpu)]
    if benchmark.name == "eval_speed" and not cpu_smoke:
        # the projected FID-30K time needs a sampling speed: this run's, eager with guidance as
        # `tessera evaluate coco --cfg-scale` samples
        guided = [r for r in measured.get("sampling_speed", []) if r.get("setting") == "tessera+cfg" and "images_per_s" in r]
        if guided:
            argv += ["--sampling-images-per-s", str(guided[0]["images_per_s"])]
    return argv


def run_benchmark(benchmark: Benchmark, argv: list[str], seconds: float, limit: str, work: Path) -> dict[str, Any]:
    """Runs one benchmark in this process, its failure or overrun recorded, not raised; stopped
    after `seconds`, what `limit` names."""
    entry: dict[str, Any] = {
        "name": benchmark.name,
        "command": shlex.join(["python", f"bench/{benchmark.name}.py", *argv]).replace(f"{REPO}/", ""),
        "reference": benchmark.reference,
        "columns": list(benchmark.columns),
        "records": [],
    }
    work.mkdir(parents=True, exist_ok=True)
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(max(1, math.ceil(seconds)))
    started = time.perf_counter()
    try:
        module = importlib.import_module(benchmark.name)
        output = module.run(module.parse_args(argv))
        if isinstance(output, dict):  # one report
            entry["records"].append(output)
        else:  # a record per setting, kept as each arrives
            for record in output:
                entry["records"].append(record)
        entry["status"] = "ok"
    except BenchmarkTimeout:
        entry.update(status="error", error=f"stopped at {limit}")
    except (Exception, SystemExit) as error:  # SystemExit: requeue_cost's way of failing
        entry.update(status="error", error=f"{type(error).__name__}: {error}"[:4000],
                     traceback=traceback.format_exc()[-4000:])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        # what one benchmark sets must not reach the next
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if "torch._dynamo" in sys.modules:  # imported by whatever compiled
            torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(work, ignore_errors=True)
    return entry


def run_suite(
    benchmarks: list[Benchmark], cpu_smoke: bool, deadline_s: float, work: Path,
    after_each: Callable[[list[dict[str, Any]]], None] = lambda entries: None,
) -> list[dict[str, Any]]:
    """Each benchmark's entry, in order; `after_each` sees the entries so far after every one."""
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    measured: dict[str, list[dict]] = {}
    for benchmark in benchmarks:
        left = deadline_s - (time.perf_counter() - started)
        if left <= 0:
            entries.append({"name": benchmark.name, "reference": benchmark.reference, "columns": list(benchmark.columns),
                            "status": "skipped", "reason": f"the suite's deadline of {deadline_s:.0f} s had passed",
                            "records": []})
        else:
            argv = arguments(benchmark, cpu_smoke, work / benchmark.name, measured)
            if cpu_smoke or left < benchmark.seconds:
                seconds, limit = left, f"the suite's deadline of {deadline_s:.0f} s"
            else:
                seconds, limit = benchmark.seconds, f"its limit of {benchmark.seconds} s"
            entries.append(run_benchmark(benchmark, argv, seconds, limit, work / benchmark.name))
            measured[benchmark.name] = entries[-1]["records"]
        entry = entries[-1]
        print(f"[gpu_suite] {benchmark.name}: {entry['status']}"
              + (f" in {entry['seconds']} s" if "seconds" in entry else "")
              + (f" ({entry.get('error') or entry.get('reason')})" if entry["status"] != "ok" else ""), flush=True)
        after_each(entries)
    return entries


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}".removesuffix(".0")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    """The run as BENCHMARKS.md entries: device, date, command, and a table per benchmark."""
    lines = [
        f"### GPU suite: {report['device']}, {report['date'][:10]}, torch {report['torch']}"
        + (f" (CUDA {report['cuda']})" if report["cuda"] else ""),
        "",
        f"`{report['command']}` ({report['seconds']:.0f} s); each benchmark's sizes are in its command.",
    ]
    for entry in report["benchmarks"]:
        lines += ["", f"**{entry['name']}**" + (f": `{entry['command']}`" if "command" in entry else ""),
                  f"reference in the same run: {entry['reference']}.", ""]
        if entry["status"] == "skipped":
            lines.append(f"Skipped: {entry['reason']}.")
            continue
        if entry["status"] == "error":
            lines += [f"Error: {entry['error']}", ""]
        fields = tuple(entry["columns"])
        rows = [record for record in entry["records"] if fields and fields[0] in record]
        for record in entry["records"] if fields else []:
            if record not in rows:  # a script's header: device, shapes, versions
                lines += ["; ".join(f"{key}: {_cell(value)}" for key, value in record.items()), ""]
        if fields and rows:
            if any("error" in row for row in rows):
                fields = (*fields, "error")
            lines += ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
            lines += ["| " + " | ".join(_cell(row.get(field)) for field in fields) + " |" for row in rows]
        elif entry["records"]:
            lines += ["| quantity | value |", "|---|---|"]
            lines += [f"| {key} | {_cell(value)} |" for key, value in entry["records"][-1].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="every script's tiny CPU mode: checks the suite runs")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="these benchmarks alone")
    parser.add_argument("--deadline-s", type=float, default=360.0,
                        help="seconds after which no benchmark starts, and a running one is stopped (360)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: the suite is for a GPU (--cpu-smoke checks it on a CPU)")
    # the scripts import each other by module name, as when run from bench/
    sys.path.insert(0, str(REPO / "bench"))

    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if not args.cpu_smoke else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if not args.cpu_smoke else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "deadline_s": args.deadline_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def write(entries: list[dict[str, Any]]) -> None:
        # after every benchmark: a run cut short still leaves what was measured
        report.update(seconds=round(time.perf_counter() - started, 1), benchmarks=entries)
        (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu_suite.md").write_text(markdown(report))

    benchmarks = [b for b in BENCHMARKS if args.only is None or b.name in args.only]
    entries = run_suite(benchmarks, args.cpu_smoke, args.deadline_s, args.out / "work", after_each=write)
    shutil.rmtree(args.out / "work", ignore_errors=True)
    write(entries)
    print(markdown(report), flush=True)
    return 0 if all(entry["status"] == "ok" for entry in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
