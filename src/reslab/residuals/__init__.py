"""Residual schemes: one module per rule, each registering itself on import.

Every module of this package is imported here (:func:`pkgutil.iter_modules`), so a new scheme is one new file
with no import line to add anywhere: it subclasses :class:`AdditiveScheme` (``y = skip(x) + contribution(F)``:
override ``skip`` and ``contribution``) or, for a rule that is not a sum of a skip path and a branch term
(history, gates over several streams, concatenation), :class:`ResidualScheme` (``begin`` / ``read`` / ``write``
/ ``end``), and registers itself with :func:`register_residual`.
"""

import importlib
import pkgutil

from reslab.residuals.base import (AdditiveScheme, Capabilities, ResidualScheme, create_residual,
                                   list_residuals, register_residual, residual_class)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AdditiveScheme", "Capabilities", "ResidualScheme", "create_residual", "list_residuals",
           "register_residual", "residual_class"]
