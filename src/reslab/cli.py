"""The ``reslab`` command: ``list``, ``train``, ``diagnose`` and ``reproduce``.

Bad input (unknown names, incompatible options, invalid sizes, missing data) prints one line,
``reslab: error: ...``, and exits with status 2 before any run directory is created.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (numbers, strings, booleans)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return k.strip(), v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="reslab", description="A workbench for residual connections.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ls = sub.add_parser("list", help="registered schemes, shortcuts, models, datasets and claims")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "schemes", "shortcuts", "models", "datasets", "claims"])

    tr = sub.add_parser("train", help="train one model into a run directory")
    tr.add_argument("--model", help="model name, e.g. resnet56, preact_resnet110, mlp20")
    tr.add_argument("--residual", default="identity", help="residual scheme (see `reslab list schemes`)")
    tr.add_argument("--shortcut", choices=["A", "B", "C", "D"], type=str.upper, help="shortcut option (default A)")
    tr.add_argument("--residual-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                    help="scheme option, e.g. gate_bias=-3 (repeatable)")
    tr.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                    help="family option, e.g. width=64 or norm=ln (repeatable)")
    tr.add_argument("--zero-init-last", action="store_true", help="zero-init the last norm of each branch")
    tr.add_argument("--data", default="mnist1d", help="dataset: mnist1d[:N], digits, cifar10[:DIR], cifar100[:DIR], "
                    "pydoc[:CTX], shakespeare[:CTX], text:PATH[@CTX]")
    tr.add_argument("--train-samples", type=int, help="train on the first N training samples only")
    tr.add_argument("--no-eval-train", dest="eval_train", action="store_false",
                    help="skip evaluating the training set after each epoch")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    tr.add_argument("--lr", type=float, default=0.1)
    tr.add_argument("--momentum", type=float, default=0.9)
    tr.add_argument("--nesterov", action="store_true")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine"])
    tr.add_argument("--milestones", type=float, nargs="+", help="step schedule: epochs at which lr *= gamma")
    tr.add_argument("--gamma", type=float, default=0.1)
    tr.add_argument("--warmup-steps", type=int, default=0)
    tr.add_argument("--warmup-lr", type=float, help="constant warm-up rate (then back to --lr)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    tr.add_argument("--out", required=True, type=Path, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    dg = sub.add_parser("diagnose", help="measure a trained run: responses, stream, grads, gates, lesion, paths...")
    dg.add_argument("run", type=Path, help="run directory (with checkpoint.pt)")
    dg.add_argument("--what", default="responses,stream,grads,lesion,paths",
                    help="comma-separated: responses, stream, grads, gates, lesion, paths, update")
    dg.add_argument("--samples", type=int, default=1000, help="training samples to measure on")

    rp = sub.add_parser("reproduce", help="run the claims of the seed and write the report")
    rp.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    rp.add_argument("--only", action="append", default=[], metavar="CLAIM",
                    help="run only this claim (repeatable, or comma-separated)")
    rp.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory")
    rp.add_argument("--jobs", type=int, help="parallel worker processes (default: CPU count, at most 4)")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


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


def _cmd_train(args: argparse.Namespace) -> None:
    from reslab import runs
    from reslab.train import TrainConfig, train

    if args.resume and (args.out / "config.json").exists() and args.model is None:
        cfg = TrainConfig.from_dict(runs.read_json(args.out / "config.json")["train"])
    else:
        if args.model is None:
            raise ValueError("--model is required (unless --resume continues an existing run)")
        cfg = TrainConfig(
            model=args.model, residual=args.residual, shortcut=args.shortcut, zero_init_last=args.zero_init_last,
            residual_kwargs=dict(args.residual_arg), model_kwargs=dict(args.model_arg), data=args.data,
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay, schedule=args.schedule,
            milestones=list(args.milestones) if args.milestones else [0.5, 0.75],
            milestones_are_fractions=not args.milestones, gamma=args.gamma, warmup_steps=args.warmup_steps,
            warmup_lr=args.warmup_lr, seed=args.seed, device=args.device, amp=args.amp,
            train_samples=args.train_samples, eval_train=args.eval_train)
    result = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    f = result.final
    line = f"{result.status}: {len(result.metrics)} epochs"
    if f:
        line += (f", train error {100 * f['train_error']:.2f}%, test error {100 * f['test_error']:.2f}%, test loss "
                 f"{f['test_loss']:.4f} nats = {f['test_loss'] / math.log(2):.4f} bits per target")
    if result.diverged_step is not None:
        line += f", non-finite loss at step {result.diverged_step}"
    print(f"{line} -> {args.out}")


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from reslab.diagnostics.diagnose import diagnose

    if args.samples <= 0:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    for name, path in diagnose(args.run, what, args.samples).items():
        print(f"{name}: {path} and {path.with_suffix('.png')}")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    import reslab
    from reslab.experiments import get_claim, list_claims, run_claim
    from reslab.experiments.base import check_data
    from reslab.report.render import render

    only = [n.strip() for a in args.only for n in a.split(",") if n.strip()]
    claims = [get_claim(n) for n in only] if only else list_claims()
    if args.jobs is not None and args.jobs <= 0:
        raise ValueError(f"--jobs must be positive, got {args.jobs}")
    out: Path = args.out
    check_data(claims, args.profile)
    for claim in claims:
        result = run_claim(claim, args.profile, out, jobs=args.jobs, quiet=args.quiet)
        print(f"{claim.name}: {result.verdict}")
    meta = {"profile": args.profile, "reslab": reslab.__version__,
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    md, html = render(out, meta)
    print(f"report: {md} and {html}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"list": _cmd_list, "train": _cmd_train, "diagnose": _cmd_diagnose,
         "reproduce": _cmd_reproduce}[args.command](args)
    except ValueError as e:
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted; rerun with --resume (train) or the same command (reproduce) to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
