"""`tessera quickstart` end to end on a small budget: every stage runs, the report is complete."""

from __future__ import annotations

import json
import math

import pytest

from tessera.cli import main


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_a_complete_report(tmp_path, monkeypatch, capsys):
    """A third of the default budget: every stage, a complete report, and samples whose colours follow their prompts."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), "--minutes", "4", "--num-samples", "1024", "--fidelity-samples", "48"]) == 0

    for name in ("report.md", "report.html", "reconstructions.png", "samples.png", "loss_curves.png", "caption_fidelity.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![samples](samples.png)" in report and "caption fidelity" in report.lower()
    fidelity = json.loads((out / "caption_fidelity.json").read_text())
    assert all(math.isfinite(v) for v in fidelity.values() if isinstance(v, float))
    # text conditioning works: a prior that ignored its prompt would draw the asked colour about as
    # often as random scenes do (~2%, 1 of 48); 4 minutes on 2 cores give ~20%
    seen = fidelity["seen"]
    assert seen["fidelity"]["color"] > 3 * seen["chance"]["color"], seen
    assert list((out / "wandb").glob("offline-run-*")), "the run is logged to W&B offline"
    printed = capsys.readouterr().out
    for stage in ("[data]", "[tokenizer]", "[tokenize]", "[prior]", "[evaluate]", "[report]"):
        assert stage in printed
