"""DINO-DETR (official-checkpoint compatible). `build_model(cfg) -> (model, criterion, postprocessor)`."""
from models.build import build_dino, build_model

__all__ = ["build_model", "build_dino"]
