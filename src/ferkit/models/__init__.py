"""Model registry and built-in networks."""

from ferkit.models.registry import create_model, get_model_info, list_models, register_model

__all__ = ["create_model", "get_model_info", "list_models", "register_model"]
