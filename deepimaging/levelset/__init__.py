"""Level-set segmentation: classic Chan-Vese (2D/3D, vector-valued), signed distances, contours,
and the refinement pipeline used by the LevelSetRefine module."""

from .chanvese import ChanVeseParams, ChanVeseResult, chan_vese, chan_vese_update, default_level_set
from .contour import SurfaceMesh, zero_contours, zero_surface
from .refine import RefineResult, refine_defaults, refine_mask
from .tsdf import sdf_to_mask, signed_distance, truncated_sdf

__all__ = ["ChanVeseParams", "ChanVeseResult", "chan_vese", "chan_vese_update", "default_level_set",
           "SurfaceMesh", "zero_contours", "zero_surface", "RefineResult", "refine_defaults", "refine_mask",
           "sdf_to_mask", "signed_distance", "truncated_sdf"]
