"""Show presets: ``python -m editing.methods.presets ROME --model demo`` prints the hyper-parameters
ROME uses on the demo model and the preset file they come from (JSON); without ``--model`` it lists
the preset files of one method, or of every method."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from editing.methods.base import METHOD_MODULES, method_class
from editing.methods.checks import InvalidHParams
from editing.methods.presets import PRESETS_ENV, find_preset, method_presets, model_key


def effective(method: str, model: str) -> dict[str, Any]:
    """What ``method`` uses on ``model`` by default, and which preset file set part of it."""
    from editing.models.loader import load_model

    cls = method_class(method).hparams_class
    handle = load_model(model)
    preset = find_preset(cls, handle)
    return {"method": method_class(method).name, "model": model, "model_key": list(model_key(handle)),
            "preset": preset.describe() if preset is not None else None,
            "hparams": cls.for_model(handle).to_dict()}


def listing(method: str | None) -> list[dict[str, Any]]:
    """Every preset file in effect for ``method`` (every built-in method when None)."""
    names = [method_class(method).name] if method else sorted(METHOD_MODULES)
    found = []
    for name in names:
        cls = method_class(name).hparams_class
        for folder in cls.preset_names:
            found.extend(p.describe() for p in method_presets(folder, cls).values())
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editing.methods.presets",
                                     description=f"Show hyper-parameter presets (user folder: ${PRESETS_ENV}).")
    parser.add_argument("method", nargs="?", help="editing method, e.g. ROME (default: list every method's presets)")
    parser.add_argument("--model", help="'demo', a local model folder or a cached Hugging Face id: print the "
                                        "method's effective hyper-parameters for it")
    args = parser.parse_args(argv)
    try:
        if args.model is not None:
            if not args.method:
                parser.error("--model needs a method")
            result: Any = effective(args.method, args.model)
        else:
            result = listing(args.method)
    except (KeyError, InvalidHParams, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
