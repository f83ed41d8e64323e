"""The one error type for bad user input."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input from the user (a config key or file, a data source, a model name, a launcher
    flag): the command line reports it as one line and exits with code 2, before anything is written.
    Anything else that goes wrong is a bug and keeps its traceback."""
