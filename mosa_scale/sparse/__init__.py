"""Sparse experts: seeded partitions of split weights, routing, and the compact expert layer."""

from mosa_scale.sparse.linear import SparseExpertLinear, merged_weight_and_bias
from mosa_scale.sparse.partition import partition
from mosa_scale.sparse.routing import Router

__all__ = ["Router", "SparseExpertLinear", "merged_weight_and_bias", "partition"]
