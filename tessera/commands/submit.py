"""`tessera submit`: render a template from slurm/ for a config and submit it with sbatch.

    tessera submit configs/tokenizer/llamagen_f16_8d.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00
    tessera submit configs/prior/300m.yaml configs/trainer/fsdp.yaml --partition gpu --dry-run
    tessera submit --job tokenize --nodes 2 --args --tokenizer T.ckpt --shards 'd/{00000..00099}.tar' --out tok/

One task per GPU: `--ntasks-per-node` is `--gpus-per-node`, and the same two numbers are passed
to the trainer as `--trainer.devices` and `--trainer.num_nodes`, so the job and Lightning's
SLURMEnvironment never disagree. `--gpus-per-node 0` makes a CPU-only job of `--tasks-per-node`
tasks. Partition, account and time limit are written only when given; otherwise sbatch's own
SBATCH_PARTITION, SBATCH_ACCOUNT and SBATCH_TIMELIMIT, or the cluster's defaults, apply. The
rendered script is kept in the run directory next to the job's output (slurm-JOBID.out).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Mapping

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
JOBS = ("tokenizer", "prior", "tokenize", "evaluate_coco")
TRAINING_JOBS = ("tokenizer", "prior")
# the model class a training config names -> its template: every stage-2 model trains as the prior does
MODEL_JOBS = {
    "lightning_modules.vqgan.VQGAN": "tokenizer",
    "lightning_modules.prior.TextImagePrior": "prior",
    "lightning_modules.rq_prior.RQTransformerPrior": "prior",
    "lightning_modules.pixel_prior.PixelCNNPrior": "prior",
    "lightning_modules.pixel_prior.ImageTransformerPrior": "prior",
    "lightning_modules.fine_stage.FineStage": "prior",
    "lightning_modules.llm.LLMTextImageModel": "prior",
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="render a SLURM job from slurm/ for a config and submit it with sbatch",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("configs", nargs="*", type=Path, help="LightningCLI YAML files, passed to `tessera fit` in order")
    submit.add_argument("--job", choices=JOBS, default=None, help="the template; for configs, read from their model class")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0 for a CPU-only job")
    submit.add_argument("--tasks-per-node", type=int, default=None, help="tasks of a CPU-only job (1); with GPUs, the GPU count")
    submit.add_argument("--cpus-per-task", type=int, default=8, help="data loader workers and threads of each task")
    submit.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00 (else SBATCH_TIMELIMIT or the partition's)")
    submit.add_argument("--partition", default=None, help="else SBATCH_PARTITION or the cluster's default")
    submit.add_argument("--account", default=None, help="else SBATCH_ACCOUNT or the user's default")
    submit.add_argument("--run-dir", type=Path, default=None,
                        help="trainer.default_root_dir and the job's output; the configs' default_root_dir by default")
    submit.add_argument("--job-name", default=None, help="tessera-JOB by default")
    submit.add_argument("--setup", default=os.environ.get("TESSERA_SETUP", ""),
                        help="shell line run before srun, e.g. 'source ~/venv/bin/activate' (default: $TESSERA_SETUP; "
                             "without one the job runs in the environment sbatch exports from this shell)")
    submit.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    submit.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                        help="everything after it goes to the tessera command, e.g. --args --trainer.max_steps=1000 (last)")
    submit.set_defaults(run=_submit)


FIELD = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """`{{name}}` fields filled from `values`; a field without a value is an error, not an empty
    string. A line holding only a field that is empty (no optional directives) is left out."""
    missing = set(FIELD.findall(template)) - values.keys()
    if missing:
        raise KeyError(f"the template needs {sorted(missing)}")
    lines = []
    for line in template.splitlines(keepends=True):
        rendered = FIELD.sub(lambda match: values[match[1]], line)
        if not (FIELD.fullmatch(line.strip()) and not rendered.strip()):
            lines.append(rendered)
    return "".join(lines)


def job_script(args: argparse.Namespace, cwd: Path) -> tuple[str, Path]:
    """The rendered sbatch script for `args` (the submit options) and its run directory."""
    job = args.job or _job_of_configs(args.configs)
    if job in TRAINING_JOBS and not args.configs:
        raise SystemExit(f"a {job} job needs its config files: tessera submit CONFIG [CONFIG ...]")
    if job not in TRAINING_JOBS and args.configs:
        raise SystemExit(f"a {job} job takes no config files; pass its options after --args")
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_task < 1:
        raise SystemExit("--nodes and --cpus-per-task must be at least 1, --gpus-per-node at least 0")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise SystemExit(f"one task per GPU: --tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}")
    tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    if tasks_per_node < 1:
        raise SystemExit("--tasks-per-node must be at least 1")

    run_dir = cwd / (args.run_dir or _default_root_dir(args.configs) or Path("runs") / job)
    cluster_options = [f"--gres=gpu:{args.gpus_per_node}"] if args.gpus_per_node else []
    cluster_options += [f"--{name}={value}" for name, value in
                        (("partition", args.partition), ("account", args.account), ("time", args.time)) if value]
    values = {
        "job_name": args.job_name or f"tessera-{job}",
        "nodes": str(args.nodes),
        "tasks_per_node": str(tasks_per_node),
        "cpus_per_task": str(args.cpus_per_task),
        "cluster_options": "\n".join(f"#SBATCH {option}" for option in cluster_options),
        "workdir": shlex.quote(str(cwd)),
        "run_dir": shlex.quote(str(run_dir)),
        "setup": args.setup or "# no setup line: the job runs in the environment sbatch exported from the submitting shell",
        "configs": " ".join(f"--config {shlex.quote(str(cwd / config))}" for config in args.configs),
        "accelerator": "gpu" if args.gpus_per_node else "cpu",
        "args": shlex.join(args.args),
    }
    return render((TEMPLATES / f"{job}.sbatch").read_text(), values), run_dir


def check_slurm_layout(num_nodes: int, devices: int, environ: Mapping[str, str] = os.environ) -> None:
    """Exit with one message (from rank 0) when the trainer's `num_nodes` x `devices` processes are not
    the tasks of the SLURM job this process runs in; nothing outside SLURM.

    Lightning checks this only for DDP: with `devices=1` each of N tasks would train alone, as
    rank 0 of a world of 1, and a `tessera fit` without `srun` in front waits for ranks that never come.
    """
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return  # not SLURM, or an interactive allocation Lightning does not treat as one
    ntasks, nnodes = int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_NNODES", "1"))
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "1" if ntasks == 1 else None)
    if ntasks > 1 and "SLURM_STEP_ID" not in environ:
        problem = f"`tessera fit` runs in the batch script of a {ntasks}-task job: start it with `srun tessera fit ...`"
    elif tasks_per_node is None:
        problem = f"this SLURM job has --ntasks={ntasks} but no --ntasks-per-node: give one task per device and node"
    elif (num_nodes, str(devices)) != (nnodes, tasks_per_node):
        problem = (f"the trainer runs num_nodes={num_nodes} x devices={devices} processes, but this SLURM job has "
                   f"--nodes={nnodes} and --ntasks-per-node={tasks_per_node}: pass --trainer.num_nodes={nnodes} "
                   f"--trainer.devices={tasks_per_node}, or submit with `tessera submit`, which sets both")
    else:
        return
    raise SystemExit(problem if environ.get("SLURM_PROCID", "0") == "0" else 1)


def _submit(args: argparse.Namespace) -> int:
    script, run_dir = job_script(args, Path.cwd())
    if args.dry_run:
        print(script, end="")
        return 0
    # SLURM does not create the output file's directory: a job whose directory is missing fails unseen
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{args.job or _job_of_configs(args.configs)}.sbatch"
    path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sbatch refused {path}: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
    print(f"[submit] job {job_id}: {path}, output {run_dir}/slurm-{job_id}.out")
    return 0


def _job_of_configs(configs: list[Path]) -> str:
    """tokenizer or prior, from the model class the configs name (the last one that names it wins)."""
    class_path = None
    for config in configs:
        model = _read_yaml(config).get("model") or {}
        class_path = model.get("class_path", class_path) if isinstance(model, dict) else class_path
    if class_path not in MODEL_JOBS:
        raise SystemExit(f"cannot tell the job from the configs' model class {class_path!r}: pass --job {{{','.join(JOBS)}}}")
    return MODEL_JOBS[class_path]


def _default_root_dir(configs: list[Path]) -> str | None:
    root = None
    for config in configs:
        root = (_read_yaml(config).get("trainer") or {}).get("default_root_dir", root)
    return root


def _read_yaml(path: Path) -> dict:
    import yaml  # jsonargparse's dependency, as LightningCLI reads the same files

    if not path.is_file():
        raise SystemExit(f"no config file {path}")
    return yaml.safe_load(path.read_text()) or {}
