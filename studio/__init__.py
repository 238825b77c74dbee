"""Studio: a local, private desktop creative studio."""

__version__ = "0.1.0"
