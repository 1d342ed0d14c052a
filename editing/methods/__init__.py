"""Editing methods, registered under their paper names.

Importing this package registers every method (each module below registers its own on import).
"""

from editing.methods.base import METHODS, EditMethod, HParams, ProgressFn, get_method, register
from editing.methods.checks import InvalidHParams


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(METHODS)


# Method modules register themselves on import; they import base, so they come after it.
from editing.methods import (  # noqa: E402, F401
    alphaedit,
    calinet,
    ft,
    grace,
    ike,
    ke,
    kn,
    memit,
    mend,
    rome,
    serac,
    tpatcher,
)

__all__ = ["METHODS", "EditMethod", "HParams", "InvalidHParams", "ProgressFn", "available_methods", "get_method",
           "register"]
