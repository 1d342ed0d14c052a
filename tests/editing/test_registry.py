"""The method registry is a table: importing the package or the shared machinery loads no method."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editing.methods import METHOD_MODULES, available_methods, get_method, method_class


def test_importing_the_core_loads_no_method_module():
    core = "editing.methods, editing.core.edit, editing.core.session, editing.analysis.stats, editing.methods.compute"
    code = (f"import sys, {core}; from editing.methods import METHOD_MODULES; "
            "print(sorted(m for m in sys.modules if m in set(METHOD_MODULES.values())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_method_is_imported_on_first_use_and_names_are_case_insensitive():
    assert available_methods() == sorted(METHOD_MODULES)
    assert get_method("rome").name == "ROME" and method_class("t-patcher").name == "T-Patcher"
    for name in available_methods():
        assert method_class(name).__module__ == METHOD_MODULES[name]
    with pytest.raises(KeyError, match="available: AlphaEdit"):
        get_method("No-Such-Method")
