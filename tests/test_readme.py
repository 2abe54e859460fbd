"""Every ```python block of README.md runs as written, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks, in order."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def test_readme_has_python_blocks() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5 and all(b.strip() for b in blocks)


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the snippets write runs/... relative to the working directory
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, namespace)  # noqa: S102 (the README's own code)
    assert (tmp_path / "runs" / "readme-mlp20" / "checkpoint.pt").is_file()


def test_readme_sweep_file_is_a_valid_sweep() -> None:
    import tomllib

    from reslab import sweep

    blocks = re.findall(r"^```toml[ \t]*\n(.*?)^```[ \t]*$", README.read_text(), flags=re.S | re.M)
    assert len(blocks) == 1
    s = sweep.parse(tomllib.loads(blocks[0]))
    assert len(s.runs) == 2 * 3 * 2 * 3 * 2  # residual (with the plain twin) x depth x lr x seed x width
