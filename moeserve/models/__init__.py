"""Model families, one file each, built from config.json's `model_type` through the registry."""

from moeserve.models.registry import MODEL_FAMILIES, build_model

__all__ = ["MODEL_FAMILIES", "build_model"]
