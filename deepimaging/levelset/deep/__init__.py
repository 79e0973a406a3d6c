"""The learned (deep Chan-Vese, LevelSet R-CNN style) refinement of a segment, 2D and 3D.

Public API (used by the CLI and the LevelSetRefine Slicer module):
:func:`train_refiner`, :func:`load_refiner`, :func:`refine_learned`, :func:`evaluate_refiner`,
:func:`write_synthetic_refine_dataset`.
"""

from .evaluate import evaluate_refiner
from .infer import LearnedRefiner, load_refiner, refine_learned
from .model import METHOD, DeepChanVese, RefinerConfig
from .synthetic import write_synthetic_refine_dataset
from .train import train_refiner

__all__ = ["evaluate_refiner", "LearnedRefiner", "load_refiner", "refine_learned", "METHOD", "DeepChanVese",
           "RefinerConfig", "write_synthetic_refine_dataset", "train_refiner"]
