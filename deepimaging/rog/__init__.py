"""ROG (Daza et al., MICCAI 2021): a 2.6M-parameter lattice for generic 3D CT/MRI segmentation,
auto-configured per dataset by a planner whose JSON-able plan travels in the checkpoint."""

from .model import ROG, count_conv_macs, count_parameters, estimate_gflops, lattice_layout, total_stride
from .plan import (ChannelInfo, DatasetSpec, LabelInfo, Plan, estimate_memory_bytes, plan_architecture,
                   plan_dataset, read_msd_dataset)

__all__ = [
    "ROG", "count_conv_macs", "count_parameters", "estimate_gflops", "lattice_layout", "total_stride",
    "ChannelInfo", "DatasetSpec", "LabelInfo", "Plan", "estimate_memory_bytes", "plan_architecture",
    "plan_dataset", "read_msd_dataset",
]
