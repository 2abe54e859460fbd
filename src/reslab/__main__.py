"""``python -m reslab ...``: the ``reslab`` command (:func:`reslab.cli.main`).

This is also the entry point for several processes: ``torchrun --nproc_per_node=N -m reslab train ...`` trains one
run with DistributedDataParallel (:mod:`reslab.distributed`). Rank 0 speaks for the run: the other ranks' output
inside the command (their copy of the final line, of a one-line ``reslab: error: ...``, of warnings) is dropped,
while their exit status is kept (2 for bad input on every rank) and a traceback that escapes the command is still
printed.
"""

from __future__ import annotations

import contextlib
import os
import sys


def _run() -> int:
    from reslab.cli import main
    from reslab.distributed import env_rank

    if env_rank() == 0:
        return main()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        return main()


if __name__ == "__main__":
    sys.exit(_run())
