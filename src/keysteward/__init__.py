"""keysteward: a key manager a cloud tenant runs for itself, and the volume engine that uses its keys."""

__version__ = "0.1.0"
