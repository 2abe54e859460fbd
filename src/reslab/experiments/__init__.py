"""One module per claim of the seed; each registers itself on import."""

from reslab.experiments.base import (PROFILES, Claim, ClaimResult, get_claim, list_claims, register_claim,
                                     run_claim)
from reslab.experiments import degradation  # noqa: F401

__all__ = ["PROFILES", "Claim", "ClaimResult", "get_claim", "list_claims", "register_claim", "run_claim"]
