"""glimp: fast collaborative reasoning between a small and a large language model."""

__version__ = "0.1.0"
