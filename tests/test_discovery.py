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


STATED = '''
import math

from reslab.residuals.base import AdditiveScheme, register_residual


@register_residual("stated_test", paper="a test")
class Stated(AdditiveScheme):
    """``y = (x + F(x)) / sqrt(2)``."""

    def skip(self, state, i):
        return self.shortcut(i, state) / math.sqrt(2)

    def contribution(self, out, h, i):
        return {contribution}

    def equation(self, x, fx, i):
        return (self.shortcut(i, x) + fx) / math.sqrt(2)
'''


def test_a_new_additive_scheme_gets_every_generic_test_and_a_wrong_equation_fails_one(tmp_path):
    """One file added to ``residuals/`` runs through every contract test with no other edit; the same file with a
    wrong branch term (``x/sqrt(2) + 3 F(x)`` where it states ``(x + F(x))/sqrt(2)``) fails at least one."""
    src, tests = Path(reslab.__file__).parent, Path(__file__).parent
    shutil.copytree(src, tmp_path / "reslab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conftest.py", "test_contract.py"):
        shutil.copy(tests / name, tmp_path / name)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    results = {}
    for label, term in (("right", "out / math.sqrt(2)"), ("wrong", "3 * out")):
        (tmp_path / "reslab" / "residuals" / "stated_test.py").write_text(STATED.format(contribution=term))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_contract.py",
                              "-k", "stated_test", "-W", "ignore"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        results[label] = out
    right, wrong = results["right"], results["wrong"]
    assert right.returncode == 0 and " passed" in right.stdout and "failed" not in right.stdout, right.stdout[-2000:]
    assert wrong.returncode == 1, wrong.stdout[-2000:]
    assert "FAILED test_contract.py::test_the_trunk_follows_the_stated_equation" in wrong.stdout


def test_imports_go_down_the_layers():
    """Schemes, the trunk and every diagnostic load without the training loop or the claims above them (a diagnostic
    that loads a trained model reads it through ``reslab.config``)."""
    code = ("import sys, pkgutil, importlib, reslab.diagnostics as d, reslab.residuals as r\n"
            "for pkg in (d, r):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
            "import reslab.config\n"
            "print(sorted(m for m in sys.modules if m in ('reslab.train', 'reslab.experiments', 'reslab.report')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
