"""A new scheme is one new file: the package finds every module in its folder, no import line to add."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import reslab

SCHEME = '''
from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("halfway_test", paper="a test")
class Halfway(AdditiveScheme):
    """``y = x + F(x) / 2``."""

    def contribution(self, out, h, i):
        return out / 2
'''


def test_a_scheme_file_in_the_package_folder_is_registered_with_no_other_edit(tmp_path):
    """A copy of the package with one file added to ``residuals/`` (and nothing else changed) lists the scheme and
    builds a model with it."""
    src = Path(reslab.__file__).parent
    shutil.copytree(src, tmp_path / "reslab", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "reslab" / "residuals" / "halfway_test.py").write_text(SCHEME)
    code = ("import reslab, torch; assert reslab.__file__.startswith(%r), reslab.__file__; "
            "print('halfway_test' in reslab.list_residuals()); "
            "m = reslab.create_model('mlp4', 'halfway_test', num_classes=3, input_shape=(5,), width=8); "
            "print(tuple(m(torch.randn(2, 5)).shape))" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "(2,", "3)"]
    assert "halfway_test" not in reslab.list_residuals()  # this process's registry is untouched
