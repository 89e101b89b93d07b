"""The one exception type inference raises for anything a user can fix."""
from __future__ import annotations


class ModelError(Exception):
    """A model could not be found, built, loaded or run.

    The message is meant for the person who wrote the configuration (it names the model,
    the file and what to do), so callers can show it as is without a traceback.
    """
