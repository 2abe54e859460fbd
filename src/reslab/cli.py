"""The ``reslab`` command: ``list``, ``train``, ``diagnose``, ``reproduce``, ``sweep``, ``report`` and ``export``.

Bad input (unknown names, incompatible options, invalid sizes, missing data) prints one line,
``reslab: error: ...``, and exits with status 2 before any run directory is created.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

if TYPE_CHECKING:
    from reslab.train import TrainConfig


TENSORBOARD_HELP = ("also write each run's metrics as TensorBoard event files (RUN/tensorboard; needs "
                    "pip install 'reslab[tensorboard]')")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--ep 2` is an error, not `--epochs 2`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (numbers, strings, booleans: ``True`` or ``true``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if v.strip().lower() in ("true", "false"):
        return k.strip(), v.strip().lower() == "true"
    try:
        return k.strip(), ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return k.strip(), v


def _parser() -> argparse.ArgumentParser:
    import reslab

    p = _Parser(prog="reslab", description="A workbench for residual connections.")
    p.add_argument("--version", action="version", version=f"reslab {reslab.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="registered schemes, shortcuts, models, datasets and claims")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "schemes", "shortcuts", "models", "datasets", "claims"])

    tr = sub.add_parser("train", help="train one model into a run directory",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_recipes_epilog())
    tr.add_argument("--model", help="model name, e.g. resnet56, preact_resnet110, mlp20, gpt4")
    tr.add_argument("--residual", help="residual scheme (default identity, or the family's: concat for densenet; "
                    "see `reslab list schemes`)")
    tr.add_argument("--shortcut", choices=["A", "B", "C", "D"], type=str.upper,
                    help="shortcut option where a ResNet stage changes shape (default A)")
    tr.add_argument("--residual-arg", dest="residual_kwargs", action="append", type=_kv, metavar="KEY=VALUE",
                    help="scheme option, e.g. gate_bias=-3 (repeatable)")
    tr.add_argument("--model-arg", dest="model_kwargs", action="append", type=_kv, metavar="KEY=VALUE",
                    help="family option, e.g. width=64 or norm=ln (repeatable)")
    tr.add_argument("--zero-init-last", action="store_true", default=None,
                    help="zero-init the last norm of each branch")
    tr.add_argument("--data", help="dataset: mnist1d[:N], digits, cifar10[:DIR], cifar100[:DIR], pydoc[:CTX], "
                    "shakespeare[:CTX], text:PATH[@CTX] (default: the family's, below)")
    tr.add_argument("--train-samples", type=int, help="train on the first N training samples only")
    tr.add_argument("--no-eval-train", dest="eval_train", action="store_false", default=None,
                    help="skip evaluating the training set after each epoch")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    tr.add_argument("--lr", type=float)
    tr.add_argument("--momentum", type=float, help="SGD only (default 0.9)")
    tr.add_argument("--nesterov", action="store_true", default=None, help="SGD only")
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--schedule", choices=["constant", "step", "cosine"])
    tr.add_argument("--milestones", type=float, nargs="+",
                    help="step schedule only: epochs at which lr *= gamma (default: at 50%% and 75%% of the epochs)")
    tr.add_argument("--gamma", type=float, help="step schedule only: the factor at each milestone (default 0.1)")
    tr.add_argument("--warmup-steps", type=int, help="iterations of warm-up (default 0)")
    tr.add_argument("--warmup-lr", type=float, help="constant warm-up rate (then back to --lr); needs --warmup-steps")
    tr.add_argument("--seed", type=int, help="default 0")
    tr.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    tr.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast (CUDA only)")
    tr.add_argument("--compile", action="store_true", default=None,
                    help="train through torch.compile of the model (part of the run's config: the numbers change in "
                         "the last bits); compiling costs seconds to a minute before the first step, so it pays off "
                         "on long runs only (benchmarks/bench_compile.py; for that reason `reproduce` compiles none "
                         "of its short runs)")
    tr.add_argument("--out", required=True, type=Path, help="run directory")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last checkpoint (options, if given, must match it)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)

    from reslab.diagnostics.diagnose import MEASUREMENTS, help_text

    dg = sub.add_parser("diagnose", help=f"measure a trained run: {', '.join(MEASUREMENTS)}",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=f"measurements (arrays and a figure each in RUN/diagnostics/):\n{help_text()}")
    dg.add_argument("run", type=Path, help="run directory (with checkpoint.pt)")
    dg.add_argument("--what", help="comma-separated measurements (listed below); default: every one that applies "
                    "to the run (the others are skipped with a note)")
    dg.add_argument("--samples", type=int, default=1000, help="training samples to measure on")
    dg.add_argument("--no-plots", dest="plots", action="store_false", help="arrays and numbers only, no figures")

    rp = sub.add_parser("reproduce", help="measure the claims of residual-network theory and write the report")
    rp.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    rp.add_argument("--only", action="append", default=[], metavar="CLAIM",
                    help="run only this claim (repeatable, or comma-separated)")
    rp.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory")
    rp.add_argument("--jobs", type=int, help="parallel worker processes (default: CPU count, at most 4)")
    rp.add_argument("--budget", type=int, default=1, metavar="K",
                    help="also run every claim at K times its budget (each claim says what K multiplies) into "
                         "OUT/budget-K, and mark a claim whose checks change outcome 'inconclusive at this budget'")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    _backend_args(rp)

    sw = sub.add_parser("sweep", help="run a grid of training runs from a TOML file (resumable; see reslab.sweep)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_sweep_epilog())
    sw.add_argument("file", type=Path, help="the sweep's TOML file")
    sw.add_argument("--out", required=True, type=Path, help="sweep directory (rerun into it to resume)")
    sw.add_argument("--jobs", type=int, help="runs at once (local default: CPU count, at most 4; ray: the cluster's "
                    "free CPUs)")
    sw.add_argument("--dry-run", action="store_true", help="validate the file and list its runs; write nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    _backend_args(sw)

    rb = sub.add_parser("report", help="write report.md and report.html of a reproduce or sweep folder from its "
                        "artifacts")
    rb.add_argument("dir", type=Path, help="the --out folder of `reslab reproduce` or `reslab sweep` (finished or "
                    "partly finished)")
    rb.add_argument("--metric", help="sweeps: the final metric to show (default: the sweep's, else test_error)")

    ex = sub.add_parser("export", help="every run's metrics (one row per epoch) as CSV, from a run, sweep or "
                        "reproduce folder")
    ex.add_argument("dir", type=Path, help="a run directory, or a folder with runs/ (sweep, reproduce)")
    ex.add_argument("--csv", type=Path, required=True, help="the CSV file to write ('-' for standard output)")
    return p


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: a process pool on this machine; ray: Ray tasks (pip install 'reslab[ray]')")
    p.add_argument("--address", help="ray: join this cluster (e.g. auto, ray://HOST:10001); default: start a local "
                   "Ray for this command")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="ray: GPUs each run asks for (default 0)")


def _sweep_epilog() -> str:
    from reslab import sweep

    return "sweep file:\n" + sweep.__doc__.split("three tables::", 1)[1].split("An axis is", 1)[0].rstrip()


def _cmd_list(args: argparse.Namespace) -> None:
    from reslab.data import list_datasets
    from reslab.experiments import list_claims
    from reslab.models import list_families
    from reslab.residuals import list_residuals, residual_class
    from reslab.shortcuts import SHORTCUTS

    what = args.what
    if what in ("all", "schemes"):
        print("Residual schemes:")
        for n in list_residuals():
            print(f"  {n:18s} {residual_class(n).paper}")
    if what in ("all", "shortcuts"):
        print("Shortcuts:")
        for k, v in SHORTCUTS.items():
            print(f"  {k:18s} {v}")
    if what in ("all", "models"):
        print("Models (family + depth, e.g. resnet56):")
        for f in list_families():
            names = ", ".join(f"{f.name}{d}" for d in f.depths)
            print(f"  {f.name:18s} {f.description}; depth {f.depth_rule}; {f.paper}\n  {'':18s} {names}")
    if what in ("all", "datasets"):
        print("Datasets:")
        for name, desc, ref in list_datasets():
            print(f"  {name:18s} {desc} ({ref})")
    if what in ("all", "claims"):
        print("Claims (reslab reproduce --only NAME):")
        for c in list_claims():
            print(f"  {c.name:18s} {c.title}")


#: ``reslab train`` options that act only under a condition on the resolved config
_ONLY_WITH = {
    "momentum": (lambda c: c.optimizer == "sgd", "applies to --optimizer sgd only"),
    "nesterov": (lambda c: c.optimizer == "sgd", "applies to --optimizer sgd only"),
    "milestones": (lambda c: c.schedule == "step", "applies to --schedule step only"),
    "gamma": (lambda c: c.schedule == "step", "applies to --schedule step only"),
    "warmup_lr": (lambda c: c.warmup_steps > 0, "needs --warmup-steps"),
}


def _recipes_epilog() -> str:
    from reslab.models import list_families

    lines = ["defaults per model family (any option above overrides them):"]
    for f in list_families():
        lines.append(f"  {f.name + ':':15s} " + ", ".join(f"{k}={v}" for k, v in f.recipe.items()))
    return "\n".join(lines)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the stored one (``--resume`` without ``--model``) or the family's recipe, with every
    option given on the command line on top; an option that would have no effect is refused."""
    from reslab.config import TrainConfig, read_run_config

    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("command", "out", "resume", "quiet", "tensorboard")}
    for key in ("residual_kwargs", "model_kwargs"):
        if key in given:
            given[key] = dict(given[key])
    if "milestones" in given:
        given["milestones_are_fractions"] = False
    if args.resume:
        if not (args.out / "config.json").exists():
            raise ValueError(f"nothing to resume: {args.out} holds no run (no config.json)")
        stored = read_run_config(args.out)[0]
        base = {} if "model" in given else TrainConfig.to_dict(stored)
    elif "model" not in given:
        raise ValueError("--model is required (unless --resume continues an existing run)")
    else:
        base = {}
    cfg = TrainConfig.from_dict({**base, **given}) if base else TrainConfig.for_model(**given)
    for key, (applies, why) in _ONLY_WITH.items():
        if key in given and not applies(cfg):
            raise ValueError(f"--{key.replace('_', '-')} {why}; it would have no effect here")
    return cfg


def _cmd_train(args: argparse.Namespace) -> None:
    from reslab.train import train

    result = train(_train_config(args), args.out, resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard)
    f = result.final
    line = f"{result.status}: {len(result.metrics)} epochs"
    if f:
        if "train_eval_error" in f:
            line += f", train error {100 * f['train_eval_error']:.2f}% (eval mode, end of training)"
        else:
            line += f", train error {100 * f['train_error']:.2f}% (running mean during the last epoch)"
        line += (f", test error {100 * f['test_error']:.2f}%, test loss {f['test_loss']:.4f} nats = "
                 f"{f['test_loss'] / math.log(2):.4f} bits per target")
    if result.reason is not None:
        line += f"; {result.reason}"
    print(f"{line} -> {args.out}")


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from reslab.diagnostics.diagnose import diagnose

    if args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    what = None if args.what is None else [w.strip() for w in args.what.split(",") if w.strip()]
    if what == []:
        raise ValueError("--what names no measurement")
    diagnose(args.run, what, args.samples, echo=lambda line: print(line, flush=True), plots=args.plots)


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from reslab.engine import check_backend, session
    from reslab.experiments import get_claim, list_claims
    from reslab.experiments.base import check_data, check_reuse
    from reslab.report.render import SMOKE_NOTE, render

    only = [n.strip() for a in args.only for n in a.split(",") if n.strip()]
    if args.only and not only:
        raise ValueError("--only needs a claim name (see `reslab list claims`)")
    claims = [get_claim(n) for n in only] if only else list_claims()
    if args.jobs is not None and args.jobs <= 0:
        raise ValueError(f"--jobs must be positive, got {args.jobs}")
    out: Path = args.out
    if args.budget < 1:
        raise ValueError(f"--budget must be a positive integer, got {args.budget}")
    larger = out / f"budget-{args.budget}"
    check_backend(args.backend, args.address, args.gpus_per_run)
    check_data(claims, args.profile)
    check_reuse(claims, args.profile, out)
    if args.budget > 1:
        check_reuse(claims, args.profile, larger, args.budget)
    note = f" ({SMOKE_NOTE})" if args.profile == "smoke" else ""
    with session(args.backend, args.address, args.jobs):  # one Ray for every claim
        _reproduce_claims(args, claims, out, larger, note)
    md, html = render(out)
    print(f"report: {md} and {html}")


def _reproduce_claims(args: argparse.Namespace, claims: list[Any], out: Path, larger: Path, note: str) -> None:
    from reslab.experiments import run_claim
    from reslab.experiments.base import compare_budgets
    from reslab.report.render import render

    for claim in claims:
        start = time.perf_counter()
        engine = dict(jobs=args.jobs, quiet=args.quiet, backend=args.backend, address=args.address,
                      gpus_per_run=args.gpus_per_run)
        verdict = run_claim(claim, args.profile, out, **engine).verdict
        if args.budget > 1:
            run_claim(claim, args.profile, larger, budget=args.budget, **engine)
            render(larger)
            rec = compare_budgets(out, larger, claim, args.budget)
            verdict = (f"{rec['verdict']} (1x: {rec['budget']['verdict_1x']}, {args.budget}x: "
                       f"{rec['budget'][f'verdict_{args.budget}x']})")
        print(f"{claim.name}: {verdict}{note} [{time.perf_counter() - start:.0f} s]")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from reslab import sweep
    from reslab.engine import check_backend

    if args.jobs is not None and args.jobs <= 0:
        raise ValueError(f"--jobs must be positive, got {args.jobs}")
    check_backend(args.backend, args.address, args.gpus_per_run)
    plan = sweep.parse(sweep.read_spec(args.file))
    if args.dry_run:
        for rid, (axes, _) in plan.runs.items():
            print(f"{rid}  ({sweep.where_of(axes)})")
        print(f"{len(plan.runs)} runs; nothing written")
        return
    index = sweep.run_sweep(plan, args.out, args.backend, args.jobs, args.address, args.gpus_per_run,
                            echo=None if args.quiet else print, tensorboard=args.tensorboard)
    counts = ", ".join(f"{n} {s}" for s, n in index.counts().items() if n)
    print(f"sweep: {counts} -> {args.out} (index.json; `reslab report {args.out}` for the summary)")


def _cmd_report(args: argparse.Namespace) -> None:
    from reslab.report.render import render

    if not args.dir.is_dir():
        raise ValueError(f"{args.dir} is not a directory")
    if (args.dir / "sweep.json").exists():
        from reslab.report.sweep import render_sweep

        md, html = render_sweep(args.dir, args.metric)
    elif args.metric is not None:
        raise ValueError("--metric applies to sweep folders only")
    else:
        md, html = render(args.dir)
    print(f"report: {md} and {html}")


def _cmd_export(args: argparse.Namespace) -> None:
    from reslab.report.export import export_csv

    n = export_csv(args.dir, args.csv)
    if str(args.csv) != "-":
        print(f"export: {n} rows -> {args.csv}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("reproduce", "sweep"):
            from reslab.distributed import launched

            if launched():  # every rank would run every run, each run joining a process group of strangers
                raise ValueError(f"`reslab {args.command}` does not run under torchrun (only `reslab train` does); "
                                 "spread its runs with --backend ray instead")
        {"list": _cmd_list, "train": _cmd_train, "diagnose": _cmd_diagnose, "reproduce": _cmd_reproduce,
         "report": _cmd_report, "sweep": _cmd_sweep, "export": _cmd_export}[args.command](args)
    except ValueError as e:
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable or vanished path: the system's reason, on one line
        where = f": {e.filename}" if e.filename else ""
        print(f"reslab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted; rerun with --resume (train) or the same command (reproduce, sweep) to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
