"""Run directories: atomic writes, metrics as JSONL, and the environment a run was made in.

Every file of a run is written to a temporary name in the same directory and renamed into place, so a
run killed at any moment leaves either the old file or the new one, never a torn one. The temporary name
(``.NAME.PID@HOST.XXXXXXXX.tmp``) says who writes it: a writer killed mid-write leaves it behind, and the next
write into that folder deletes it once its process is gone.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: the user's umask, not mkstemp's private 0600


_HOST = platform.node() or "localhost"
#: ``.NAME.PID@HOST.XXXXXXXX.tmp``: a file being written by process PID on HOST (mkstemp's 8 random characters)
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[^@/]+)\.[a-z0-9_]{8}\.tmp$")


def is_temp(path: Path | str) -> bool:
    """Whether ``path`` is a file :func:`_atomic` writes before renaming it into place (a hidden ``.tmp``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Delete the temporary files that writers on this host left in ``folder`` when they were killed (SIGKILL, out
    of memory) mid-write; a live writer's file is kept. Returns what was deleted."""
    gone = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for e in entries:
        m = _TEMP.match(e.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            p = Path(e.path)
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _atomic(path: Path, write: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the folder should be: say so, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    remove_stale_temps(path.parent)  # what a killed writer left here


def write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(data))


def write_json(path: Path | str, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_jsonable) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically (the whole file is replaced)."""
    write_text(path, "".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in rows))


def save_torch(path: Path | str, obj: Any) -> None:
    """``torch.save`` atomically."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def read_json(path: Path | str) -> Any:
    """The JSON value in ``path``.

    Raises:
        ValueError: the file is not UTF-8 JSON; the message names the file.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """One JSON value per non-empty line of ``path`` (``[]`` when it does not exist).

    Raises:
        ValueError: a line that is not JSON; the message names the file and line.
    """
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} line {i} is not valid JSON ({e})") from None
    return rows


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from the JSON that :func:`write_json` writes (tuples become lists...)."""
    return json.loads(json.dumps(obj, default=_jsonable))


def _jsonable(o: Any) -> Any:
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def git_revision() -> str | None:
    """The git revision of the reslab checkout, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, git revision and device of the current process."""
    import numpy

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "git_revision": git_revision(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "metrics", "rng")  # what train() saves (+ "cuda_rng")


def load_checkpoint(path: Path | str, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`reslab.train.train` without executing anything stored in it.

    The file is read with ``torch.load(weights_only=True)``: a reslab checkpoint holds only state dicts
    (tensors, numbers, strings, booleans, None, lists, tuples and dicts), ints, the metrics (a list of dicts of
    floats) and the RNG states (uint8 tensors), all of which PyTorch's restricted unpickler builds without an
    allow-list; any other pickled global (a class, or a callable such as ``os.system``) is refused before it
    is called.

    Raises:
        ValueError: one line naming the file, if it is missing or unreadable, truncated or corrupt, holds a
            pickled object other than tensors and plain data, or is not a dict with the keys train() writes.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {p} is missing" if not p.exists() else f"checkpoint {p} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below is the one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler names the global it refused ("GLOBAL posix.system ...", "Unsupported
        # global", "Unsupported class"); its other errors (unknown opcodes, bad stack) are corrupt data
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Unsupported class" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise ValueError(f"checkpoint {p} refused: it holds a pickled object{what} other than tensors and "
                             "plain data") from None
        raise ValueError(f"checkpoint {p} is not a readable reslab checkpoint (truncated or corrupt)") from None
    except PermissionError as e:
        raise ValueError(f"checkpoint {p} cannot be read: {e.strerror or e}") from None
    except Exception:  # noqa: BLE001 (RuntimeError from the zip reader, OSError from a seek past the end, EOFError...)
        raise ValueError(f"checkpoint {p} is not a readable reslab checkpoint (truncated or corrupt)") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: it lacks {', '.join(map(repr, missing))}")
    if not isinstance(ckpt["model"], dict) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: its 'model' is not a state dict of tensors")
    if not isinstance(ckpt["optimizer"], dict) or not isinstance(ckpt["metrics"], list):
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: its 'optimizer' or 'metrics' has the "
                         "wrong type")
    if not (isinstance(ckpt["epoch"], int) and isinstance(ckpt["step"], int)):
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: its 'epoch' or 'step' is not an integer")
    if not (torch.is_tensor(ckpt["rng"]) and ckpt["rng"].dtype == torch.uint8):
        raise ValueError(f"checkpoint {p} is not a reslab checkpoint: its 'rng' is not a uint8 RNG state")
    return ckpt
