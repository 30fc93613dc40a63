"""Adapter methods, their configuration, and injection into frozen towers."""

from mosa_scale.adapters.config import AdapterConfig
from mosa_scale.adapters.factory import ADAPTER_MARK, is_adapter_name
from mosa_scale.adapters.inject import InjectionReport, inject_adapters, trainable_named_parameters
from mosa_scale.adapters.registry import get_method, register_method, registered_methods

__all__ = [
    "ADAPTER_MARK",
    "AdapterConfig",
    "InjectionReport",
    "get_method",
    "inject_adapters",
    "is_adapter_name",
    "register_method",
    "registered_methods",
    "trainable_named_parameters",
]
