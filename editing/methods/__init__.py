"""Editing methods, registered under their paper names.

The registry is a table of names to modules (:data:`~editing.methods.base.METHOD_MODULES`): a
method's module is imported the first time :func:`get_method` asks for it, so importing this
package (or the shared machinery: edits, sessions, statistics) loads no method.
"""

from editing.methods.base import (
    METHOD_MODULES,
    METHODS,
    EditMethod,
    HParams,
    ProgressFn,
    get_method,
    import_all_methods,
    method_class,
    method_names,
    register,
)
from editing.methods.checks import InvalidHParams


def available_methods() -> list[str]:
    """Names of every method, sorted (nothing is imported)."""
    return method_names()


__all__ = ["METHODS", "METHOD_MODULES", "EditMethod", "HParams", "InvalidHParams", "ProgressFn", "available_methods",
           "get_method", "import_all_methods", "method_class", "register"]
