"""satloc's models: SAT, the CAM baseline, the SAT loss, map-to-box post-processing, checkpoints.

Nothing here knows about Ray or object storage layouts (checkpoints go through fsspec URLs).
"""
from model.boxes import boxes_from_maps
from model.checkpoint import default_config, load_checkpoint, save_checkpoint
from model.factory import count_parameters, create_model, model_names
from model.losses import SATLossConfig, sat_loss
from model.output import LocOutput

__all__ = [
    "LocOutput",
    "SATLossConfig",
    "boxes_from_maps",
    "count_parameters",
    "create_model",
    "default_config",
    "load_checkpoint",
    "model_names",
    "sat_loss",
    "save_checkpoint",
]
