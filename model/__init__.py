"""satloc's models: SAT, the CAM baseline, the SAT loss, map-to-box post-processing, checkpoints.

Nothing here knows about Ray or storage: a checkpoint is bytes here (``checkpoint_bytes``,
``load_checkpoint_bytes``); the jobs read and write those bytes at URLs.
"""
from model.boxes import boxes_from_maps
from model.checkpoint import checkpoint_bytes, default_config, load_checkpoint_bytes
from model.factory import count_parameters, create_model, model_names
from model.losses import SATLossConfig, sat_loss
from model.output import LocOutput

__all__ = [
    "LocOutput",
    "SATLossConfig",
    "boxes_from_maps",
    "checkpoint_bytes",
    "count_parameters",
    "create_model",
    "default_config",
    "load_checkpoint_bytes",
    "model_names",
    "sat_loss",
]
