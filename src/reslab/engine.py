"""Where training runs execute: a local process pool, or Ray tasks on a local or existing Ray cluster.

reslab writes no scheduler of its own. A *job* is one training run (a :class:`~reslab.train.TrainConfig` and the
run directory it trains into); :func:`run_jobs` hands a list of them to a backend and reports each outcome as it
arrives:

- ``local`` (the default): a ``spawn`` process pool of ``workers`` processes (default: the CPU count, at most
  4), one torch thread per run, so that small models do not oversubscribe the cores. ``workers=1`` trains in
  this process with every core (and restores the thread count after).
- ``ray``: each run is a Ray task asking for ``cpus_per_run`` CPUs (its torch threads) and ``gpus_per_run`` GPUs.
  ``address`` joins an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); without it a
  local Ray is started for the call and stopped after (:func:`session` keeps one connection for several calls;
  Ray keeps retrying an address where nothing answers for minutes: Ctrl-C stops it). On a cluster the run
  directories must be on a file system every node sees (the runs write their own artifacts), and reslab must be
  installed on every node.
  Ray is an optional extra: ``pip install 'reslab[ray]'``.

Every run goes through :func:`reslab.train.train` with ``resume=True``, so a job whose directory holds a killed run
continues it (with the same final numbers) and a finished one returns at once. A failed run never stops the
others: its error is reported as :class:`Outcome` ``status="failed"``. Ctrl-C stops every backend at once: the
pool is terminated and Ray tasks are cancelled; each run's files are written atomically, so each resumes from
its last checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from reslab.train import TrainConfig

BACKENDS = ("local", "ray")
RAY_MISSING = "the ray backend needs Ray: pip install 'reslab[ray]'"


@dataclass(frozen=True)
class Job:
    """One run: ``cfg`` trained into the directory ``out``; ``key`` names it to the caller (a run id); with
    ``tensorboard`` its metrics also go to TensorBoard event files (``out/tensorboard``)."""

    key: str
    cfg: TrainConfig
    out: str
    tensorboard: bool = False


@dataclass(frozen=True)
class Outcome:
    """What became of a job: ``status`` is ``completed``, ``diverged`` or ``failed`` (``error`` then says why, in
    one line: a ``ValueError``'s message, or the exception's type and message)."""

    key: str
    status: str
    error: str | None = None


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def execute(job: Job, threads: int) -> Outcome:
    """Train one job with ``threads`` torch threads; every exception becomes a ``failed`` outcome (the thread
    count of the calling process is restored)."""
    import torch

    from reslab.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return Outcome(job.key, train(job.cfg, job.out, resume=True, quiet=True, tensorboard=job.tensorboard).status)
    except ValueError as e:
        return Outcome(job.key, "failed", str(e).splitlines()[0] if str(e) else "ValueError")
    except Exception as e:  # noqa: BLE001 (a bug or a resource error in one run must not stop the others)
        where = traceback.extract_tb(e.__traceback__)[-1]
        first = str(e).splitlines()[0] if str(e) else ""
        return Outcome(job.key, "failed", f"{type(e).__name__}: {first} ({os.path.basename(where.filename)}:"
                                          f"{where.lineno})")
    finally:
        torch.set_num_threads(before)


def _init_worker() -> None:
    """A pool worker ignores Ctrl-C (the terminal sends it to the whole process group): the parent stops it by
    terminating the pool, so a Ctrl-C prints one line, not a traceback per worker. Its progress bars lock with a
    thread lock: tqdm's default also makes a multiprocessing semaphore, which a stopped worker would leave behind."""
    from tqdm.auto import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def check_backend(backend: str, address: str | None = None, gpus_per_run: float = 0.0) -> None:
    """Refuse an unknown backend, Ray options without Ray, or Ray when it is not installed (one line each)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ValueError("--address applies to --backend ray only")
    if gpus_per_run and backend != "ray":
        raise ValueError("--gpus-per-run applies to --backend ray only (the local pool's runs use --device)")
    if gpus_per_run < 0:
        raise ValueError(f"--gpus-per-run must be non-negative, got {gpus_per_run}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(RAY_MISSING)


def run_jobs(jobs: Sequence[Job], backend: str = "local", workers: int | None = None, address: str | None = None,
             cpus_per_run: int = 1, gpus_per_run: float = 0.0, on_start: Callable[[Job], None] | None = None,
             on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every job on ``backend`` and return their outcomes in completion order.

    ``on_start`` is called (in this process) when a job is handed to the backend, ``on_done`` when its outcome
    arrives. ``workers`` bounds the runs in flight (local: the pool size; Ray: ``None`` lets the cluster's
    resources decide).
    """
    check_backend(backend, address, gpus_per_run)
    if workers is not None and workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    if cpus_per_run <= 0:
        raise ValueError(f"cpus_per_run must be positive, got {cpus_per_run}")
    start = on_start or (lambda job: None)
    done = on_done or (lambda outcome: None)
    outcomes: list[Outcome] = []

    def finish(o: Outcome) -> None:
        outcomes.append(o)
        done(o)

    if not jobs:  # nothing to run (a claim without training runs, a rerun with every run done): no pool to start
        return outcomes
    if backend == "ray":
        _run_ray(jobs, workers, address, cpus_per_run, gpus_per_run, start, finish)
        return outcomes
    workers = default_workers() if workers is None else workers
    if workers == 1:  # asked for: in this process, with every core
        threads = max(1, os.cpu_count() or 1) if cpus_per_run == 1 else cpus_per_run
        ready: list[Outcome] = []
        _drive(jobs, 1, lambda job: ready.append(execute(job, threads)), lambda: [ready.pop()], start, finish)
        return outcomes
    # the pool, with cpus_per_run threads per run however few runs are left: a run's numbers depend on its thread
    # count (summation order), so a rerun that resumes one run must train it as the first attempt did
    workers = min(workers, len(jobs))
    arrived: queue.Queue[Outcome] = queue.Queue()
    # the workers ignore Ctrl-C from their first instruction: SIG_IGN is inherited through fork and exec, so it is
    # set while the pool starts them (_init_worker runs only once a worker has imported reslab and torch)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        pool = get_context("spawn").Pool(workers, initializer=_init_worker)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    # leaving the block terminates the pool: on Ctrl-C no queued run starts and the running ones stop at once
    with pool:
        def submit(job: Job) -> None:
            def lost(e: BaseException) -> None:  # the job could not be sent to or returned from a worker
                arrived.put(Outcome(job.key, "failed", f"{type(e).__name__}: {e}"))

            pool.apply_async(execute, (job, cpus_per_run), callback=arrived.put, error_callback=lost)

        _drive(jobs, workers, submit, lambda: [arrived.get()], start, finish)
    return outcomes


def _drive(jobs: Sequence[Job], limit: int, submit: Callable[[Job], None], wait: Callable[[], list[Outcome]],
           start: Callable[[Job], None], finish: Callable[[Outcome], None]) -> None:
    """Keep ``limit`` jobs in flight: a job is started (``start``, then ``submit``) when a slot is free, so that
    what the caller marks as started is running, not queued."""
    pending, in_flight = list(jobs), 0
    while pending or in_flight:
        while pending and in_flight < limit:
            job = pending.pop(0)
            start(job)
            submit(job)
            in_flight += 1
        for o in wait():
            in_flight -= 1
            finish(o)


@contextlib.contextmanager
def session(backend: str, address: str | None = None, workers: int | None = None,
            cpus_per_run: int = 1) -> Iterator[None]:
    """Connect to the backend once for several :func:`run_jobs` calls (``ray``: start a local Ray, or join
    ``address``; stopped or left when the block ends; ``local``: nothing to do). A failure to connect is a
    ``ValueError`` raised before the caller writes anything."""
    check_backend(backend, address)
    if backend != "ray":
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    opts: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    if address is None:
        opts["num_cpus"] = workers * cpus_per_run if workers is not None else (os.cpu_count() or 1)
    try:
        ray.init(address=address, **opts)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot reach Ray at {address!r}: {str(e).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _run_ray(jobs: Sequence[Job], workers: int | None, address: str | None, cpus: int, gpus: float,
             start: Callable[[Job], None], finish: Callable[[Outcome], None]) -> None:
    import ray

    running: dict[Any, Job] = {}

    def submit(job: Job) -> None:
        running[remote.remote(job, cpus)] = job

    def wait() -> list[Outcome]:
        ready, _ = ray.wait(list(running), num_returns=1)
        out = []
        for ref in ready:
            job = running.pop(ref)
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayError as e:  # the worker died (killed, out of memory)
                out.append(Outcome(job.key, "failed", f"Ray task failed: {str(e).splitlines()[0]}"))
        return out

    with session("ray", address, workers, cpus):  # joins the caller's session if there is one
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(execute)
        try:
            _drive(jobs, workers or len(jobs), submit, wait, start, finish)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
