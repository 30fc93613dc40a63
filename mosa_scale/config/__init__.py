"""Run configuration: frozen dataclasses, YAML loading, dotted overrides, validation."""

from mosa_scale.config.errors import ConfigError, Problems

__all__ = ["ConfigError", "Problems"]
