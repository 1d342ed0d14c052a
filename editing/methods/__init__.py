"""Editing methods, registered under their paper names.

Each module below registers its methods on import; add new method modules to this list.
"""

from editing.methods.base import METHODS, EditMethod, HParams, ProgressFn, get_method, register

__all__ = ["METHODS", "EditMethod", "HParams", "ProgressFn", "available_methods", "get_method", "register"]


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(METHODS)
import editing.methods.mend  # noqa: E402,F401
import editing.methods.ke  # noqa: E402,F401
import editing.methods.ft  # noqa: E402,F401
import editing.methods.kn  # noqa: E402,F401
import editing.methods.serac  # noqa: E402,F401
import editing.methods.ike  # noqa: E402,F401
import editing.methods.tpatcher  # noqa: E402,F401
import editing.methods.calinet  # noqa: E402,F401
import editing.methods.grace  # noqa: E402,F401
