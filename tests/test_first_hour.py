"""README's "Your own pictures, in the first hour", run as written on a folder this test writes."""

import json
import random
import re
import shlex
from pathlib import Path

import pytest

from datamodules.shapes import caption, render, sample_scene
from tessera.commands.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_commands(heading: str) -> list[list[str]]:
    """The `tessera ...` lines of the first bash block under `heading`, continuation lines joined."""
    section = (REPO / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("tessera ")]


def write_pictures(folder: Path, count: int, first: int = 0) -> list[dict]:
    """`count` captioned JPEGs of shapes scenes in `folder`, and their captions-file lines."""
    folder.mkdir(exist_ok=True)
    lines = []
    for index in range(first, first + count):
        scene = sample_scene(random.Random(index))
        name = f"{index:04d}.jpg"
        render(scene, 48).save(folder / name, quality=95)
        lines.append({"file": name, "caption": caption(scene)})
    return lines


def for_a_test(argv: list[str]) -> list[str]:
    """The README's command with a test's budgets: a few steps, no worker processes, no Inception file."""
    if argv[0] == "fit":
        return argv + ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
                       "--data.batch_size=8", "--data.num_workers=0", "--trainer.enable_progress_bar=false"]
    if argv[:2] == ["evaluate", "fid"]:
        weights = argv.index("--inception-weights")
        return argv[:weights] + argv[weights + 2:] + [
            "--feature-extractor", "tests.test_evaluation:tiny_extractor", "--workers", "0"]
    return argv


@pytest.mark.slow
def test_the_first_hour_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    pictures = tmp_path / "my_pictures"
    for split, lines in (("train", write_pictures(pictures, 48)), ("val", write_pictures(pictures, 16, first=48))):
        (pictures / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)

    commands = readme_commands("Your own pictures, in the first hour")
    assert [argv[0] for argv in commands] == ["shards", "shards", "data", "fit", "export", "fit", "sample", "evaluate"]
    printed = {}
    for argv in commands:
        assert main(for_a_test(argv)) == 0, argv
        printed[argv[0]] = capsys.readouterr().out

    assert json.loads(printed["data"])["readable"] == 64  # 48 training and 16 validation pictures
    assert len(list((tmp_path / "samples/mine/images").glob("*.png"))) == 4
    fid = json.loads(printed["evaluate"])
    assert (fid["real_count"], fid["fake_count"]) == (64, 4) and fid["fid"] >= 0
