"""featcache: offline teacher-feature caching for lidar BEV detector distillation."""

__version__ = "0.1.0"
