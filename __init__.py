"""llmd: pool the spare GPUs of an office into one inference cluster."""

__version__ = "0.1.0"
