"""Model families, registered on import."""

from reslab.models.base import (ResidualNet, create_model, init_from_batch, list_families, list_models,
                                parse_model_name, plain_twin, register_family)
from reslab.models import cifar_resnet, densenet, gpt, mlp  # noqa: F401

__all__ = ["ResidualNet", "create_model", "init_from_batch", "list_families", "list_models", "parse_model_name",
           "plain_twin", "register_family"]
