"""Residual schemes: one module per rule, all registered on import."""

from reslab.residuals.base import (AdditiveScheme, Capabilities, ResidualScheme, create_residual,
                                   list_residuals, register_residual, residual_class)
from reslab.residuals import (conv_shortcut, deepnorm, dropout_shortcut, highway, identity,  # noqa: F401
                              layerscale, norm_placement, plain, rezero, scaled, skipinit)

__all__ = ["AdditiveScheme", "Capabilities", "ResidualScheme", "create_residual", "list_residuals",
           "register_residual", "residual_class"]
