"""Killing the command line at random points: ``train``, ``sweep`` (local and Ray) and ``reproduce``.

Each test starts the real command as a subprocess in its own session, kills it after a seeded random delay (SIGKILL
of its whole process group, or of its whole session for Ray, whose workers have groups of their own; or Ctrl-C's
SIGINT to the group), checks that no process of it is left and that every file it left parses (writes are atomic:
no torn file, whatever the moment), then continues it (``--resume``, or the same command again) and checks that the
final numbers equal those of an uninterrupted run. Each test prints its kill points (``pytest -s``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from reslab import runs
from reslab.cli import main

TRAIN = ["--model", "mlp4", "--model-arg", "width=8", "--residual", "dropout_shortcut", "--data", "mnist1d:200",
         "--epochs", "90", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1", "--device",
         "cpu", "--quiet"]  # ~2 s of training; dropout draws from the global RNG, which the checkpoint must restore
SWEEP = """\
[base]
model = "mlp4"
data = "mnist1d:200"
epochs = 30
batch_size = 16
device = "cpu"
[base.model_kwargs]
width = 8
[axes]
residual = ["identity", "rezero"]
seed = [0, 1]
"""  # four runs of ~1 s
REPRODUCE = ["reproduce", "--profile", "smoke", "--only", "degradation", "--jobs", "1", "--quiet"]  # the cheapest


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _start(argv: list[str], **env: str) -> subprocess.Popen:
    """The command in a session (and process group) of its own, as a terminal would run it."""
    return subprocess.Popen([sys.executable, "-m", "reslab.cli", *argv], env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (status {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _session(sid: int) -> list[tuple[int, str, bytes]]:
    """The live processes of session ``sid``: (pid, state, command line)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] not in "ZX":
                found.append((int(d), fields[0], Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ")))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _naming(path: str) -> list[int]:
    """Live processes whose command line names ``path``."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if path.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                continue
    return found


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Send ``sig`` to the command's whole process group; return its exit status and stderr."""
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _no_leftovers(sid: int, grace: float = 10.0) -> None:
    """No process of the session outlives the kill (Ray's raylet and workers, pool workers): any still there
    after ``grace`` seconds is killed (by pid) and reported."""
    deadline = time.monotonic() + grace
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session(sid)
    for pid, _, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"


def check_run_dir(run: Path) -> int:
    """Every file of a run directory parses, and they agree; return the epochs its checkpoint holds (0: none).

    A temporary file of an atomic write may be left by a kill (it never has the real name); anything else must
    read back whole.
    """
    names = {p.name for p in run.iterdir() if not runs.is_temp(p)}
    assert names <= {"config.json", "env.json", "result.json", "metrics.jsonl", "checkpoint.pt"}, names
    if not names:
        return 0
    assert "config.json" in names, names  # written first: nothing exists without it
    runs.read_json(run / "config.json")
    if "env.json" in names:
        runs.read_json(run / "env.json")
    metrics = runs.read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
    epochs = 0
    if "checkpoint.pt" in names:
        ckpt = runs.load_checkpoint(run / "checkpoint.pt")
        epochs = ckpt["epoch"]
        assert _strip(ckpt["metrics"]) == _strip(metrics[:epochs])
    assert epochs <= len(metrics) <= epochs + 1  # metrics are written just before the checkpoint
    if "result.json" in names:
        result = runs.read_json(run / "result.json")
        assert result["status"] in ("running", "completed", "diverged"), result
        if result["status"] == "running":
            assert result["epoch"] <= epochs
    return epochs


def no_temp_files(root: Path) -> None:
    left = [p for p in root.rglob("*") if runs.is_temp(p)]
    assert not left, f"temporary files left: {left}"


# ----------------------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], float]:
    """The uninterrupted run's metrics (trained in this process: the same code, the same threads) and the seconds
    it took, which scale the kill delays to this machine."""
    out = tmp_path_factory.mktemp("train_ref") / "run"
    start = time.perf_counter()
    assert main(["train", *TRAIN, "--out", str(out)]) == 0
    return _strip(runs.read_jsonl(out / "metrics.jsonl")), time.perf_counter() - start


def _training_started(run: Path, before: tuple | None) -> Callable[[], bool]:
    """True once the process has written result.json afresh (it does so just before its first step)."""
    def ready() -> bool:
        try:
            st = (run / "result.json").stat()
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_mtime_ns) != before
    return ready


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def test_train_sigkill_at_random_points_resumes_identically(train_reference, tmp_path):
    reference, seconds = train_reference
    rng = random.Random(13)
    run = tmp_path / "run"
    epochs = []
    for k in range(3):
        argv = ["train", *TRAIN, "--out", str(run)] if k == 0 else ["train", "--out", str(run), "--resume", "--quiet"]
        before = _stamp(run / "result.json")
        proc = _start(argv)
        _wait_for("training started", _training_started(run, before), proc)
        delay = rng.uniform(0.02, 0.3) * seconds  # three kills within 90% of the training
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before kill {k + 1}"
        code, _ = _kill(proc)
        assert code == -signal.SIGKILL
        _no_leftovers(proc.pid)
        epochs.append(check_run_dir(run))
        print(f"train kill {k + 1}: {delay:.2f} s into training ({seconds:.2f} s uninterrupted), checkpoint at "
              f"epoch {epochs[-1]}")
    assert epochs == sorted(epochs) and epochs[-1] < 90
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert check_run_dir(run) == 90
    assert _strip(runs.read_jsonl(run / "metrics.jsonl")) == reference
    assert runs.read_json(run / "result.json")["final"]["test_loss"] == reference[-1]["test_loss"]
    no_temp_files(run)


def test_train_ctrl_c_is_one_line_and_resumable(train_reference, tmp_path):
    reference, seconds = train_reference
    run = tmp_path / "run"
    proc = _start(["train", *TRAIN, "--out", str(run)])
    _wait_for("training started", _training_started(run, None), proc)
    delay = random.Random(7).uniform(0.1, 0.6) * seconds
    time.sleep(delay)
    code, err = _kill(proc, signal.SIGINT)
    _no_leftovers(proc.pid)
    assert code == 130, err
    assert err.count("\n") == 1 and err.startswith("reslab: interrupted"), err
    assert runs.read_json(run / "result.json")["status"] == "running"
    done = check_run_dir(run)
    print(f"train Ctrl-C: {delay:.2f} s into training, checkpoint at epoch {done}")
    assert 0 < done < 90
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert _strip(runs.read_jsonl(run / "metrics.jsonl")) == reference
    no_temp_files(run)


# ----------------------------------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("sweep_file") / "s.toml"
    f.write_text(SWEEP)
    return f


@pytest.fixture(scope="module")
def sweep_reference(sweep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every run's metrics, each trained uninterrupted in this process as a pool worker trains it."""
    from reslab import sweep
    from reslab.engine import Job, execute

    plan = sweep.parse(sweep.read_spec(sweep_file))
    root = tmp_path_factory.mktemp("sweep_ref")
    ref = {}
    for rid, (_, cfg) in plan.runs.items():
        assert execute(Job(rid, cfg, str(root / rid)), 1).status == "completed"
        ref[rid] = _strip(runs.read_jsonl(root / rid / "metrics.jsonl"))
    return ref


def check_sweep_dir(root: Path, finished: bool = False) -> dict[str, int]:
    """sweep.json and index.json parse, every run directory parses; the epochs each run's checkpoint holds."""
    if not root.exists():
        return {}
    if (root / "sweep.json").exists():
        runs.read_json(root / "sweep.json")
    index = runs.read_json(root / "index.json")["runs"] if (root / "index.json").exists() else {}
    epochs = {p.name: check_run_dir(p) for p in (root / "runs").iterdir()} if (root / "runs").exists() else {}
    for rid, e in epochs.items():
        if index.get(rid, {}).get("state") == "done":
            assert e == 30, (rid, e)  # the index never says done before the run is
    if finished:
        assert {r["state"] for r in index.values()} == {"done"}, index
    return epochs


def _same_as_reference(root: Path, reference: dict[str, list[dict]]) -> None:
    index = runs.read_json(root / "index.json")
    assert index["counts"]["done"] == len(reference) and set(index["runs"]) == set(reference)
    for rid, rows in reference.items():
        assert _strip(runs.read_jsonl(root / "runs" / rid / "metrics.jsonl")) == rows, rid
        assert index["runs"][rid]["final"]["test_loss"] == rows[-1]["test_loss"]


def _new_checkpoint(root: Path, since: float) -> Callable[[], bool]:
    """True once a run under ``root`` has written a checkpoint after ``since`` (a time.time())."""
    def ready() -> bool:
        for p in root.glob("runs/*/checkpoint.pt"):
            try:
                if p.stat().st_mtime > since:
                    return True
            except FileNotFoundError:
                continue
        return False
    return ready


def test_sweep_sigkill_and_ctrl_c_at_random_points_rerun_identically(sweep_file, sweep_reference, tmp_path):
    """Three interruptions of the same sweep, then the same command to the end: SIGKILL anywhere (parsing, the pool
    starting, training), SIGKILL mid-training, and Ctrl-C mid-training (one line, status 130, index consistent)."""
    rng = random.Random(29)
    out = tmp_path / "sweep"
    argv = ["sweep", str(sweep_file), "--out", str(out), "--jobs", "2", "--quiet"]
    for k, (sig, anchor, span) in enumerate([(signal.SIGKILL, "the sweep's index", 5.0),
                                              (signal.SIGKILL, "a run's next epoch", 1.0),
                                              (signal.SIGINT, "a run's next epoch", 1.0)]):
        since = time.time()
        proc = _start(argv)
        if anchor == "the sweep's index":
            _wait_for(anchor, lambda: (out / "index.json").exists(), proc)
        else:
            _wait_for(anchor, _new_checkpoint(out, since), proc)
        delay = rng.uniform(0.0, span)
        time.sleep(delay)
        assert proc.poll() is None, f"the sweep ended before interruption {k + 1}"
        code, err = _kill(proc, sig)  # to the whole process group, as a terminal's Ctrl-C
        _no_leftovers(proc.pid)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 130, err
            assert err.count("\n") == 1 and err.startswith("reslab: interrupted"), err
            index = runs.read_json(out / "index.json")
            assert index["counts"]["running"] == 0 and index["counts"]["failed"] == 0, index["counts"]
        epochs = check_sweep_dir(out)
        print(f"sweep {signal.Signals(sig).name} {k + 1}: {delay:.2f} s after {anchor}; checkpoints at epochs "
              f"{sorted(epochs.values())}")
    assert main(argv) == 0  # the same command again
    check_sweep_dir(out, finished=True)
    _same_as_reference(out, sweep_reference)
    no_temp_files(out)


def test_sweep_ctrl_c_while_workers_start_is_one_line(sweep_file, tmp_path):
    """Ctrl-C reaches the workers too. Here the sweep's own process is stopped while the signal arrives (as when it is
    busy), so each worker shows what it does with Ctrl-C on its own: it must not print a traceback."""
    out = tmp_path / "sweep"
    proc = _start(["sweep", str(sweep_file), "--out", str(out), "--jobs", "2", "--quiet"])
    _wait_for("the sweep's index", lambda: (out / "index.json").exists(), proc)
    time.sleep(0.2)  # the pool has just started its workers: they are importing reslab
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(b"spawn_main" in c for _, _, c in _session(proc.pid)):
            time.sleep(0.05)  # a worker that takes Ctrl-C as KeyboardInterrupt ends here, with its traceback
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    _no_leftovers(proc.pid)
    assert proc.returncode == 130, err
    check_sweep_dir(out)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("reslab: interrupted"), err


def test_sweep_on_ray_sigkill_reruns_identically(sweep_file, sweep_reference, tmp_path):
    pytest.importorskip("ray")
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    out = tmp_path / "sweep"
    argv = ["sweep", str(sweep_file), "--out", str(out), "--jobs", "2", "--quiet", "--backend", "ray"]
    env = dict(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = _start(argv, **env)
        _wait_for("a run's start", lambda: any(out.glob("runs/*/config.json")), proc)
        delay = random.Random(5).uniform(0.0, 0.5)  # the first two runs train at once, ~1 s each
        time.sleep(delay)
        assert proc.poll() is None, "the sweep ended before the kill"
        # Ray's workers run in process groups of their own: killed with the group alone they would finish their
        # epoch (here: their run) before they notice; kill every process of the command's session at once
        others = [pid for pid, _, _ in _session(proc.pid) if pid != proc.pid]
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        _no_leftovers(proc.pid, grace=20)
        epochs = check_sweep_dir(out)
        print(f"ray sweep kill: {delay:.2f} s after the first run started, checkpoints at {sorted(epochs.values())}")
        rerun = _start(argv, **env)
        _, err = rerun.communicate(timeout=300)
        _no_leftovers(rerun.pid, grace=20)
        assert rerun.returncode == 0, err
        check_sweep_dir(out, finished=True)
        _same_as_reference(out, sweep_reference)
        no_temp_files(out)
    finally:
        for pid in _naming(ray_tmp):  # anything of this Ray that escaped the session (none so far)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- reproduce


def test_reproduce_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "rep"
    assert main([*REPRODUCE, "--out", str(ref)]) == 0
    total = len(list((ref / "runs").iterdir()))
    rng = random.Random(11)
    nth, delay = rng.randint(2, total - 2), rng.uniform(0.0, 0.1)  # its runs take ~0.1 s each here
    proc = _start([*REPRODUCE, "--out", str(out)])
    _wait_for(f"run {nth}", lambda: (out / "runs").is_dir() and len(list((out / "runs").iterdir())) >= nth, proc)
    time.sleep(delay)
    assert proc.poll() is None, "the reproduction ended before the kill"
    code, _ = _kill(proc)
    assert code == -signal.SIGKILL
    _no_leftovers(proc.pid)
    epochs = {p.name: check_run_dir(p) for p in (out / "runs").iterdir()}
    finished = sum(runs.read_json(p / "result.json")["status"] == "completed" for p in (out / "runs").iterdir()
                   if (p / "result.json").exists())
    print(f"reproduce kill: {delay:.2f} s after run {nth} of {total} started; {finished} finished, "
          f"{sum(e > 0 for e in epochs.values())} with a checkpoint")
    for f in (out / "claims").rglob("*.json") if (out / "claims").exists() else ():
        runs.read_json(f)
    assert main([*REPRODUCE, "--out", str(out)]) == 0
    mine, theirs = (runs.read_json(d / "claims" / "degradation" / "claim.json") for d in (out, ref))
    assert mine["verdict"] == theirs["verdict"] and mine["table"] == theirs["table"]
    assert mine["checks"] == theirs["checks"]
    for run in (ref / "runs").iterdir():
        assert _strip(runs.read_jsonl(out / "runs" / run.name / "metrics.jsonl")) == \
            _strip(runs.read_jsonl(run / "metrics.jsonl")), run.name
    no_temp_files(out / "runs")
