"""The one error type of the config package (a leaf module: every config file may raise it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config key, value or file that does not fit the schema."""
