"""Adapter methods, their configuration, and injection into frozen towers (and its undoing)."""

from mosa_scale.adapters.catalog import discover_methods, registered_methods
from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.adapters.factory import ADAPTER_MARK, is_adapter_name
from mosa_scale.adapters.inject import InjectionReport, inject_adapters, trainable_named_parameters
from mosa_scale.adapters.registry import get_method, register_method
from mosa_scale.adapters.wrap import Wrapper, remove_adapters, unwrap

__all__ = [
    "ADAPTER_MARK",
    "AdapterConfig",
    "InjectionReport",
    "Wrapper",
    "discover_methods",
    "get_method",
    "inject_adapters",
    "is_adapter_name",
    "register_method",
    "registered_methods",
    "remove_adapters",
    "trainable_named_parameters",
    "unwrap",
]
