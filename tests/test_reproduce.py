"""``reslab reproduce``: end to end on the smoke profile, and verdicts computed from the measurements."""

from __future__ import annotations

import math

import pytest

from reslab import runs
from reslab.cli import main
from reslab.experiments import get_claim, list_claims
from reslab.experiments.base import RECIPE_ROWS, VERDICTS, Context


def test_reproduce_smoke_end_to_end_and_rerun_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--profile", "smoke", "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    for c in list_claims():
        stored = runs.read_json(out / "claims" / c.name / "claim.json")
        assert stored["verdict"] in VERDICTS and stored["checks"] and stored["table"]
        assert all((out / "claims" / c.name / f).stat().st_size > 1000 for f in stored["figures"])
        assert f"`{c.name}`" in (out / "report.md").read_text()
    claim = runs.read_json(out / "claims" / "degradation" / "claim.json")
    assert claim["verdict"] in VERDICTS
    # The recipe rows: the paper's beside ours, ours from the configs and the steps the runs really trained.
    for c in list_claims():
        recipe = runs.read_json(out / "claims" / c.name / "claim.json")["recipe"]
        assert [r[""] for r in recipe] == list(RECIPE_ROWS)
        assert recipe[0]["published"] and recipe[0]["ours"] and recipe[-1]["ours"]
        assert all(r["ours"] for r in recipe) or not c.runs("smoke")
    steps = {runs.read_json(out / "runs" / r / "result.json")["final"]["step"]
             for r in get_claim("degradation").runs("smoke")}
    training = next(r["ours"] for r in claim["recipe"] if r[""] == "training")
    ours = {r[""]: r["ours"] for r in claim["recipe"]}
    assert f"{min(steps):,}" in training and "SGD" in ours["optimiser"] and ours["weight decay"] == "1e-4"
    assert (out / "claims" / "degradation" / "degradation.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Verdict:" in md and claim["verdict"] in md and "28.54" in md
    assert md.count("### Recipe: published and ours") == len(list_claims())
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    assert md.count("smoke test of the pipeline, not evidence") >= 2 * len(list_claims())  # summary and section
    # The table is the mean over seeds of what the runs wrote.
    spec = get_claim("degradation").runs("smoke")
    ids = [r for r in spec if r.startswith("plain-d8-")]
    finals = [runs.read_jsonl(out / "runs" / r / "metrics.jsonl")[-1] for r in ids]
    row = next(r for r in claim["table"] if r["variant"] == "plain" and r["depth"] == 8)
    assert row["train error, mean (%)"] == pytest.approx(100 * sum(f["train_eval_error"] for f in finals) / len(finals))
    # Rerunning trains nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")}
    assert main(["reproduce", "--profile", "smoke", "--only", "degradation", "--out", str(out), "--jobs", "1",
                 "--quiet"]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def _fake_runs(out, errors):
    """Write finished runs whose final training errors are given, as ``train`` would have."""
    spec = get_claim("degradation").runs("smoke")
    for rid in spec:
        variant, depth, seed = rid.rsplit("-", 2)
        e = errors[(variant, int(depth[1:]))] + 0.002 * int(seed[1:])
        d = out / "runs" / rid
        runs.write_jsonl(d / "metrics.jsonl", [{"epoch": 1, "train_error": e, "train_eval_error": e,
                                                "test_error": e}])
        runs.write_json(d / "result.json", {"status": "completed"})
    return spec


@pytest.mark.parametrize("plain_deep,res_deep,expected", [
    (0.40, 0.10, "reproduced"),          # plain degrades, residual does not
    (0.40, 0.30, "partly reproduced"),   # both degrade, residual less
    (0.10, 0.10, "not reproduced"),      # nothing degrades
])
def test_degradation_verdict_follows_the_numbers(tmp_path, plain_deep, res_deep, expected):
    errors = {("plain", 4): 0.10, ("plain", 8): plain_deep, ("residual", 4): 0.10, ("residual", 8): res_deep,
              ("residual-zero-init", 4): 0.1, ("residual-zero-init", 8): 0.1}
    spec = _fake_runs(tmp_path, errors)
    result = get_claim("degradation").analyse(Context(spec, tmp_path / "runs", tmp_path, "smoke"))
    assert result.verdict == expected
    assert math.isclose(result.checks[0]["difference"], 100 * (plain_deep - 0.10), abs_tol=1e-7)  # points


def test_missing_data_fails_before_any_training(tmp_path, monkeypatch, capsys):
    """A claim whose corpus is missing stops ``reproduce`` at the start, before an earlier claim trains."""
    import reslab.experiments
    from reslab.experiments.base import Claim
    from reslab.train import TrainConfig

    good = TrainConfig(model="mlp4", data="digits", epochs=1, model_kwargs={"width": 4})
    bad = TrainConfig(data=f"text:{tmp_path / 'nope.txt'}")
    claims = {name: Claim(name, "t", "s", "p", runs=lambda profile, c=cfg, n=name: {"r-" + n: c},
                          analyse=lambda ctx: None) for name, cfg in (("first", good), ("second", bad))}
    monkeypatch.setattr(reslab.experiments, "get_claim", claims.__getitem__)
    rep = tmp_path / "rep"
    assert main(["reproduce", "--profile", "smoke", "--only", "first,second", "--out", str(rep), "--jobs", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and err.count("\n") == 1
    assert not rep.exists()  # the first claim's run never started


def test_run_ids_read_back_and_a_malformed_one_is_one_line():
    from reslab.experiments import degradation, lr_sensitivity, transformers
    from reslab.experiments.base import split_id

    assert transformers.parse_trend_id("lm-block_attnres-L6-s1-1of4") == ("block_attnres", 6, 1, 4)
    assert transformers.parse_trend_id(transformers.run_id("pre-ln", 12, 3)) == ("pre-ln", 12, 3, 1)
    assert lr_sensitivity.parse_id(lr_sensitivity.run_id("scaled", 8, 0.1, 2)) == ("scaled", 8, 0.1, 2)
    assert degradation.parse_id("residual-zero-init-d56-s2") == ("residual-zero-init", 56, 2)
    for bad in ("lrs-scaled-b8-lrX-s2", "lrs--b8-lr0.1-s2", "scaled-b8-lr0.1-s2", "lrs-b8"):
        with pytest.raises(ValueError, match=r"is not of the form lrs-NAME-bINT-lrFLOAT-sINT$"):
            split_id(bad, "lrs-", ("b", int), ("lr", float), ("s", int))
