"""``reslab reproduce``'s run folder: a run is reused only when its config is the one asked for, profiles never
mix in one output folder, and Ctrl-C stops the worker pool at once with every run resumable."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

from reslab import runs
from reslab.cli import main
from reslab.experiments import get_claim


def _store_run(root, rid, cfg, status="completed"):
    d = root / "runs" / rid
    runs.write_json(d / "config.json", {"train": cfg.to_dict(), "model": {}})
    runs.write_jsonl(d / "metrics.jsonl", [{"epoch": 1, "train_error": 0.5, "train_eval_error": 0.5,
                                            "test_error": 0.5}])
    runs.write_json(d / "result.json", {"status": status})


def test_a_finished_run_of_another_config_is_never_reused(tmp_path, capsys):
    """The bug: a smoke run with the quick run's id was taken as the quick run (2 epochs on 1,000 samples)."""
    out = tmp_path / "mix"
    smoke, quick = get_claim("degradation").runs("smoke"), get_claim("degradation").runs("quick")
    rid = next(r for r in smoke if r in quick)  # the same id in both profiles
    smoke_cfg = smoke[rid]
    _store_run(out, rid, smoke_cfg)
    code = main(["reproduce", "--profile", "quick", "--only", "degradation", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds a run with another config" in err and rid in err, err
    assert runs.read_json(out / "runs" / rid / "config.json")["train"] == smoke_cfg.to_dict()  # untouched


def test_profiles_do_not_mix_in_one_output_folder(tmp_path, capsys):
    out = tmp_path / "mix"
    runs.write_json(out / "reproduce.json", {"profile": "smoke"})
    code = main(["reproduce", "--profile", "quick", "--only", "growth", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "made with profile 'smoke' at budget 1, not 'quick' at budget 1" in err


SCRIPT = """
import signal
import sys
# Ctrl-C as in a terminal, also when the test runner was started in the background (which passes SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

from reslab.experiments.base import Claim, ClaimResult, register_claim
from reslab.train import TrainConfig

CFGS = {f"r{i}": TrainConfig(model="mlp4", model_kwargs={"width": 8}, data="mnist1d:2000", epochs=EPOCHS,
                             optimizer="adam", lr=1e-3, seed=i) for i in range(6)}
register_claim(Claim("slow", "t", "s", "p", runs=lambda profile: CFGS,
                     analyse=lambda ctx: ClaimResult("inconclusive", "no analysis")))

if __name__ == "__main__":
    from reslab.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_the_pool_at_once_and_the_rerun_finishes(tmp_path):
    script = tmp_path / "slow_claim.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("EPOCHS", "15"))
    out = tmp_path / "rep"
    argv = [sys.executable, str(script), "reproduce", "--profile", "smoke", "--only", "slow", "--out", str(out),
            "--jobs", "2", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("runs/*/checkpoint.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # to the main process only: it must stop its workers itself
    _, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130 and "interrupted" in err.splitlines()[-1], err
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop"
    done = [p for p in out.glob("runs/*/result.json") if runs.read_json(p)["status"] == "completed"]
    assert len(done) < 6  # queued runs were cancelled, not finished
    assert subprocess.run(argv, capture_output=True, timeout=600).returncode == 0  # resumes and finishes
    assert all(runs.read_json(out / "runs" / f"r{i}" / "result.json")["status"] == "completed" for i in range(6))


def test_budget_scales_what_each_claim_says():
    from reslab.experiments.base import planned

    deg, lm = get_claim("degradation"), get_claim("transformers")
    for rid, cfg in planned(deg, "smoke", 4).items():
        assert cfg.epochs == 4 * deg.runs("smoke")[rid].epochs and "epochs" in deg.budget
    for rid, cfg in planned(lm, "smoke", 4).items():
        base = lm.runs("smoke")[rid]
        assert cfg.train_samples == 4 * base.train_samples and cfg.epochs == base.epochs
    # at budget 1 the runs are the claim's own, evaluating the training set once, after the final epoch
    assert planned(deg, "smoke", 1) == {rid: replace(c, eval_train="final") for rid, c in deg.runs("smoke").items()}
    assert {c.eval_train for c in deg.runs("smoke").values()} == {True}
    assert {c.eval_train for c in planned(lm, "smoke", 1).values()} == {False}  # the claim's own choice is kept


def _claim_json(root, name, verdict, checks):
    runs.write_json(root / "claims" / name / "claim.json", {"claim": name, "verdict": verdict, "checks": checks})


def test_checks_that_flip_with_the_budget_make_the_claim_inconclusive(tmp_path):
    from reslab.experiments.base import INCONCLUSIVE_AT_BUDGET, compare_budgets

    claim = get_claim("degradation")
    small, big = tmp_path / "a", tmp_path / "a" / "budget-4"
    _claim_json(small, claim.name, "reproduced", [{"check": "plain degrades", "difference": 5.0, "passed": True},
                                                  {"check": "residual does not", "difference": 0.1, "passed": True}])
    _claim_json(big, claim.name, "partly reproduced", [{"check": "plain degrades", "difference": 9.0, "passed": True},
                                                       {"check": "residual does not", "difference": 3.0,
                                                        "passed": False}])
    rec = compare_budgets(small, big, claim, 4)
    assert rec["verdict"] == INCONCLUSIVE_AT_BUDGET
    b = rec["budget"]
    assert (b["verdict_1x"], b["verdict_4x"], b["agree"]) == ("reproduced", "partly reproduced", False)
    assert b["checks"][1] == {"check": "residual does not", "value at 1x": 0.1, "passed at 1x": True,
                              "value at 4x": 3.0, "passed at 4x": False, "agree": False}
    assert runs.read_json(small / "claims" / claim.name / "claim.json") == rec
    _claim_json(big, claim.name, "reproduced", [{"check": "plain degrades", "difference": 9.0, "passed": True},
                                                {"check": "residual does not", "difference": 0.3, "passed": True}])
    _claim_json(small, claim.name, "reproduced", rec["checks"])
    assert compare_budgets(small, big, claim, 4)["verdict"] == "reproduced"  # agreement keeps the verdict


def test_reproduce_with_a_budget_runs_both_and_reports_the_agreement(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--profile", "smoke", "--only", "growth", "--budget", "2", "--out", str(out),
                 "--jobs", "1", "--quiet"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("growth: ") and "(1x: " in line and "2x: " in line, line
    claim = runs.read_json(out / "claims" / "growth" / "claim.json")
    assert claim["budget"]["factor"] == 2 and len(claim["budget"]["checks"]) == len(claim["checks"])
    assert runs.read_json(out / "budget-2" / "reproduce.json")["budget"] == 2
    assert (out / "budget-2" / "report.html").is_file()
    md = (out / "report.md").read_text()
    assert "### Budget stability" in md and "2x the random initialisations" in md
    # the larger reproduction's seeds really were doubled
    big = runs.read_json(out / "budget-2" / "claims" / "growth" / "claim.json")
    assert big["table"] != claim["table"]
    code = main(["reproduce", "--profile", "smoke", "--only", "growth", "--budget", "3", "--out", str(out / "budget-2"),
                 "--quiet"])
    assert code == 2 and "at budget 2, not 'smoke' at budget 1" in capsys.readouterr().err


def test_a_claim_with_nothing_left_to_train_runs_with_a_pool_size_above_one(tmp_path, capsys):
    """A claim without training runs (growth: measured at initialisation), or a rerun with every run done, under
    ``--jobs 2``: no pool is started for no jobs (it used to fail with "Number of processes must be at least 1")."""
    from reslab.engine import run_jobs

    assert run_jobs([], "local", workers=2) == []
    out = tmp_path / "out"
    for _ in range(2):  # the second time over the same folder
        main(["reproduce", "--only", "growth", "--profile", "smoke", "--out", str(out), "--jobs", "2",
              "--quiet"])
    assert "growth:" in capsys.readouterr().out
