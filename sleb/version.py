"""The package version, on its own so every layer can record it (pyproject.toml reads it from here)."""

__version__ = "0.4.0"
