"""One module per claim the report measures; each registers itself on import, in report order."""

from reslab.experiments.base import (PROFILES, Claim, ClaimResult, Context, get_claim, list_claims, register_claim,
                                     run_claim)
from reslab.experiments import (degradation, responses, gradient_highway, ensemble, paths, growth,  # noqa: F401
                                transformers, dilution, lr_sensitivity, shortcuts, preactivation,
                                densenet)

__all__ = ["PROFILES", "Claim", "ClaimResult", "Context", "get_claim", "list_claims", "register_claim", "run_claim"]
