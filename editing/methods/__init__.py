"""Editing methods, registered under their paper names.

Each module below registers its methods on import; add new method modules to this list.
"""

from editing.methods.base import METHODS, EditMethod, HParams, ProgressFn, get_method, register

__all__ = ["METHODS", "EditMethod", "HParams", "ProgressFn", "available_methods", "get_method", "register"]


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(METHODS)
