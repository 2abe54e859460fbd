"""Residual schemes: one module per rule, all registered on import."""

from reslab.residuals.base import (AdditiveScheme, Capabilities, ResidualScheme, create_residual,
                                   list_residuals, register_residual, residual_class)
from reslab.residuals import (attnres, concat, conv_shortcut, deepnorm, denseformer, dropout_shortcut,  # noqa: F401
                              highway, hyper, identity, layerscale, norm_placement, plain, rezero, scaled, skipinit,
                              value_residual)

__all__ = ["AdditiveScheme", "Capabilities", "ResidualScheme", "create_residual", "list_residuals",
           "register_residual", "residual_class"]
