"""`tessera quickstart` end to end on a small budget: every stage runs, the report is complete."""

from __future__ import annotations

import json
import math

import pytest

from tessera.cli import main


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_a_complete_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), "--minutes", "1.5", "--num-samples", "512", "--fidelity-samples", "24"]) == 0

    for name in ("report.md", "report.html", "reconstructions.png", "samples.png", "loss_curves.png", "caption_fidelity.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![samples](samples.png)" in report and "caption fidelity" in report.lower()
    fidelity = json.loads((out / "caption_fidelity.json").read_text())
    assert all(math.isfinite(v) for v in fidelity.values() if isinstance(v, float))
    assert list((out / "wandb").glob("offline-run-*")), "the run is logged to W&B offline"
    printed = capsys.readouterr().out
    for stage in ("[data]", "[tokenizer]", "[tokenize]", "[prior]", "[evaluate]", "[report]"):
        assert stage in printed
