"""`tessera quickstart` end to end on a few steps: every stage runs, the report is complete and says
what a run shorter than the default means."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tessera.commands.cli import main
from tessera.commands.quickstart import PRIOR_CONFIG, PRIOR_SHARE, TOKENIZER_CONFIG, TOKENIZER_SHARE, Stage, loss_curves, overlay, shortfall


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_a_complete_report(tmp_path, monkeypatch, capsys):
    """A fifth of the default steps: every stage, a complete report, and samples whose colours and kinds follow their prompts."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quickstart"
    argv = ["--tokenizer-steps", "300", "--prior-steps", "600", "--num-samples", "1024", "--fidelity-samples", "48"]
    assert main(["quickstart", "--out", str(out), *argv]) == 0

    for name in ("report.md", "report.html", "reconstructions.png", "samples.png", "loss_curves.png", "caption_fidelity.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![samples](samples.png)" in report and "caption fidelity" in report.lower()
    fidelity = json.loads((out / "caption_fidelity.json").read_text())
    assert all(math.isfinite(v) for v in fidelity.values() if isinstance(v, float))
    # text conditioning works: a prior that ignored its prompt would draw the asked colours about as
    # often as random scenes do (colour ~2%, colour and kind ~0.3%); these steps give 48% and 27%,
    # the default's 1,425 and 2,546 steps about 97% and 90%
    seen = fidelity["seen"]
    for attribute in ("color", "color_and_shape"):
        assert seen["fidelity"][attribute] > 10 * seen["chance"][attribute], seen
    assert list((out / "wandb").glob("offline-run-*")), "the run is logged to W&B offline"
    printed = capsys.readouterr().out
    for stage in ("[data]", "[tokenizer]", "[tokenize]", "[prior]", "[evaluate]", "[report]"):
        assert stage in printed
    # fewer steps than the default: said atop the report and last in the printed summary
    warning = "The tokenizer trained 300 of the default 1,425 steps; the prior trained 600 of the default 2,546 steps"
    assert report.splitlines()[2].startswith(f"**{warning}") and warning in printed.splitlines()[-1]


def _stages(tokenizer_trained: int, prior_trained: int, **steps) -> list[Stage]:
    tokenizer = Stage("tokenizer", TOKENIZER_CONFIG, TOKENIZER_SHARE, steps.get("tokenizer"))
    prior = Stage("prior", PRIOR_CONFIG, PRIOR_SHARE, steps.get("prior"))
    tokenizer.trained, prior.trained = tokenizer_trained, prior_trained
    return [tokenizer, prior]


def test_report_warns_when_a_time_limit_or_fewer_steps_left_a_stage_short_of_the_default():
    """Numbers of a shortened run are below the default's: the report must say so, and why."""
    assert shortfall(_stages(1425, 2546)) is None
    assert shortfall(_stages(1425, 3000, prior=4000)) is None, "a time limit past the default steps leaves nothing short"
    assert shortfall(_stages(74, 225)) == (
        "The tokenizer stopped on the time limit after 74 of 1,425 steps; the prior stopped on the time limit after "
        "225 of 2,546 steps: results are below what the default reaches."
    )
    assert shortfall(_stages(1425, 800, prior=800)) == "The prior trained 800 of the default 2,546 steps: results are below what the default reaches."


def test_stages_end_on_their_steps_alone_unless_given_minutes(tmp_path):
    """A time limit, however generous, makes the model depend on the machine's speed and load."""
    prior = Stage("prior", PRIOR_CONFIG, PRIOR_SHARE, steps=300)
    trainer = yaml.safe_load(overlay(tmp_path, prior, tmp_path / "run", None, {}).read_text())["trainer"]
    assert trainer["max_steps"] == 300 and "max_time" not in trainer
    trainer = yaml.safe_load(overlay(tmp_path, prior, tmp_path / "run", 90.0, {}).read_text())["trainer"]
    assert trainer["max_steps"] == 300 and trainer["max_time"] == "00:00:01:30"


def test_a_stage_of_no_steps_is_refused():
    with pytest.raises(ValueError, match="--prior-steps must be at least 1"):
        Stage("prior", PRIOR_CONFIG, PRIOR_SHARE, steps=0)


def test_loss_curves_draw_a_stage_that_ended_before_its_first_logged_step(tmp_path):
    """A stage shorter than log_every_n_steps has no metrics.csv: no curve, but the figure is drawn."""
    (tmp_path / "tokenizer" / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "tokenizer" / "csv" / "version_0" / "metrics.csv").write_text("step,train/rec_loss\n49,0.5\n99,0.25\n")
    loss_curves({"tokenizer": tmp_path / "tokenizer", "prior": tmp_path / "prior"}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_showcase_prompts_are_captions_of_the_training_grammar():
    """A prompt outside the grammar asks the prior for what it never saw: the grids must not show that."""
    import yaml

    from datamodules.shapes import caption
    from datamodules.shapes_analysis import parse_prompt
    from tessera.commands.evaluate_shapes import HELD_OUT_SCENES
    from tessera.commands.quickstart import CONFIGS, SAMPLE_PROMPTS

    config = yaml.safe_load((CONFIGS / "prior" / "tiny_shapes.yaml").read_text())
    logger_prompts = next(c["init_args"]["prompts"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("SampleLogger"))
    for prompt in SAMPLE_PROMPTS + logger_prompts:
        parse_prompt(prompt)  # raises for text outside the grammar
    held_out = {caption(scene) for scene in HELD_OUT_SCENES}
    assert any(p in held_out for p in SAMPLE_PROMPTS) and not all(p in held_out for p in SAMPLE_PROMPTS)
    assert {parse_prompt(p)["layout"] for p in SAMPLE_PROMPTS} == {"single", "pair", "row", "column"}
