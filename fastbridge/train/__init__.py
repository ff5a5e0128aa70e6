"""Training and evaluation of vision-language bridges (``fastbridge train`` / ``fastbridge demo``).

Needs the ``eval`` extra (datasets, pycocoevalcap, pillow, matplotlib, tqdm).
"""
from .loop import TrainConfig, compare, evaluate, greedy_decode, run
from .models import BRIDGES, SIZES, BridgeModel, ModelSize, build_model

__all__ = ["TrainConfig", "run", "compare", "evaluate", "greedy_decode", "BRIDGES", "SIZES", "BridgeModel",
           "ModelSize", "build_model"]
