"""The one source of the release number: ``pyproject.toml`` reads it, and all three packages export it."""
__version__ = "0.1.0"
