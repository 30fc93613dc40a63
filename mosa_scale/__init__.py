"""mosa_scale: MoSA (Mixture of Sparse Adapters) on large frozen vision backbones."""

__version__ = "0.1.0"
