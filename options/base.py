"""What every part of the settings floor shares: the repository's paths and the one-line errors."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SETTINGS = os.path.join(REPO_ROOT, "Implementation.json")


class SettingsError(ValueError):
    """A bad or missing setting. Its message is one line meant for the user."""


class MissingFileError(FileNotFoundError):
    """An input file another script should have written. The message says which script."""


class UnreadableFileError(SettingsError):
    """An input that exists but cannot be read (truncated, corrupt, foreign). One line for the user."""



def resolve_path(path: str) -> str:
    """Absolute path; a relative one is taken from the repository root, not the working dir."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))
