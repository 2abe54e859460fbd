"""Residual schemes: one module per rule, all registered on import."""

from reslab.residuals.base import (AdditiveScheme, Capabilities, ResidualScheme, create_residual,
                                   list_residuals, register_residual, residual_class)
from reslab.residuals import (conv_shortcut, dropout_shortcut, highway, identity, layerscale, plain,  # noqa: F401
                              rezero, scaled, skipinit)

__all__ = ["AdditiveScheme", "Capabilities", "ResidualScheme", "create_residual", "list_residuals",
           "register_residual", "residual_class"]
