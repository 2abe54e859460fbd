"""reslab: a workbench for residual connections.

Build any residual form into a real model, measure what the theory claims, and reproduce each claim.
"""

from reslab.branch import BranchSpec
from reslab.models import ResidualNet, create_model, list_models, plain_twin
from reslab.residuals import create_residual, list_residuals, register_residual
from reslab.trunk import Trunk

__version__ = "0.1.0"

__all__ = ["BranchSpec", "ResidualNet", "Trunk", "create_model", "create_residual", "list_models",
           "list_residuals", "plain_twin", "register_residual", "__version__"]
