"""The checks of issue 14 that only a GPU can answer, as one prepared script for a lent machine.

Run from the repository root: ``python scripts/gpu_check.py [--out DIR]`` (default ``$OUT`` or
``out/gpu-check``). It writes ``gpu-check.json`` there, prints one line per check, and exits non-zero
if any check failed. On a machine without CUDA it runs the same checks on the CPU (``--device cpu``
is what the CPU test does), so the script itself is tested where no GPU is lent.

1. Every method edits a tiny LLaMA in the GPU's default half precision: the edit changes the model's
   predictions, leaves the shared weights untouched at rest, and reverting restores every bit; the
   edit's time and the CUDA allocator's peak are recorded (MEND, KE and SERAC train a few steps first).
2. SmolLM2-135M, if it is installed: ROME's first and later edit times and peak memory in half
   precision, and whether the edit takes ("Rome" becomes the greedy answer).
3. With two or more GPUs: the tiny LLaMA spread over two with a ``device_map``, each method's
   predictions after the edit against the same model on one GPU (equal up to half-precision rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from editing.core.request import EditRequest  # noqa: E402
from editing.core.session import EditSession  # noqa: E402
from editing.methods.base import get_method, method_names  # noqa: E402
from editing.models.loader import ModelHandle, load_model  # noqa: E402

REQUEST = EditRequest("The capital of {} is", "France", "Rome", "Paris")
PROMPTS = ["The capital of France is", "Paris is the capital of", "The capital of Spain is"]
LEARNED = ("MEND", "KE", "SERAC")


def tiny_llama_folder(root: Path) -> Path:
    """A tiny random LLaMA saved to disk, so that it loads through ``load_model`` like a real model."""
    from editing.models.tiny import tiny_model

    folder = root / "tiny-llama"
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(folder, safe_serialization=True)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def snapshot(handle: ModelHandle) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in handle.model.named_parameters()}


def unchanged(handle: ModelHandle, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(param, before[name]) for name, param in handle.model.named_parameters())


def next_token_logprobs(session: EditSession) -> torch.Tensor:
    """Log-probabilities of the next token after each of :data:`PROMPTS`, with the session's edits."""
    from editing.analysis.scoring import last_token_logprobs

    with session.active():
        routes = session.routes(PROMPTS)
        return torch.stack([last_token_logprobs(route.handle, [route.prompt])[0].float().cpu() for route in routes])


def hparams_for(method: str, handle: ModelHandle, editors: Path) -> dict[str, Any]:
    """Settings for one check: a quickly trained editor for the learned methods, else the defaults."""
    if method not in LEARNED:
        return {}
    from editing.train import TRAINERS, train_editor

    os.environ["EDITSCOPE_EDITORS"] = str(editors)
    get_method(method)  # registers its trainer
    folder, _report = train_editor(handle, method, TRAINERS[method].quick)
    return {"checkpoint": str(folder)}


def check_methods(handle: ModelHandle, editors: Path, record: Callable[[dict[str, Any]], None]) -> None:
    """Check 1 on ``handle``: every method edits, changes predictions, and reverts bit for bit."""
    for method in method_names():
        started = time.perf_counter()
        try:
            hparams = hparams_for(method, handle, editors)
            before = snapshot(handle)
            session = EditSession(handle)
            plain = next_token_logprobs(session)
            edit = session.apply(method, [REQUEST], hparams)
            after = next_token_logprobs(session)
            ok = unchanged(handle, before) and not torch.equal(plain, after)
            record({"check": "method", "method": method, "ok": ok, "device": str(handle.device),
                    "dtype": str(handle.dtype), "edit_s": round(edit.stats.wall_time_s, 4),
                    "peak_memory_mib": round(edit.stats.peak_memory_bytes / 2**20, 2),
                    "memory_kind": edit.stats.memory_kind, "changed_predictions": not torch.equal(plain, after),
                    "weights_untouched_at_rest": unchanged(handle, before)})
        except Exception as err:  # every failure is recorded; the next check still runs
            record({"check": "method", "method": method, "ok": False, "error": repr(err),
                    "trace": traceback.format_exc(limit=6), "seconds": round(time.perf_counter() - started, 2)})


def check_smollm2(device: str, record: Callable[[dict[str, Any]], None]) -> None:
    """Check 2: ROME on SmolLM2-135M in the device's default precision (skipped if not installed)."""
    try:
        handle = load_model("smollm2-135m", device=device)
    except Exception as err:
        record({"check": "smollm2", "ok": None, "skipped": repr(err)})
        return
    from editing.analysis.scoring import generate
    from eval.realcost import REAL_REQUESTS

    session = EditSession(handle)
    before = snapshot(handle)
    times, peaks = [], []
    for request in REAL_REQUESTS[:3]:
        edit = session.apply("ROME", [request])
        times.append(round(edit.stats.wall_time_s, 3))
        peaks.append(round(edit.stats.peak_memory_bytes / 2**20, 1))
    with session.active():
        answer = generate(handle, [REAL_REQUESTS[0].text], max_new_tokens=4)[0]
    record({"check": "smollm2", "ok": unchanged(handle, before), "dtype": str(handle.dtype),
            "edit_s": times, "peak_memory_mib": peaks, "first_answer_after": answer,
            "takes": REAL_REQUESTS[0].target_new.lower() in answer.lower()})


def check_sharded(folder: Path, editors: Path, record: Callable[[dict[str, Any]], None]) -> None:
    """Check 3: with several GPUs, a sharded model's edits against one GPU's."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        record({"check": "sharded", "ok": None, "skipped": "fewer than two CUDA devices"})
        return
    single = load_model(str(folder), device="cuda:0")
    # explicit: for a model this small "auto" or "balanced" would keep every layer on one GPU
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    sharded = load_model(str(folder), device_map=split)
    record({"check": "sharded-placement", "ok": len(sharded.devices) > 1, "devices": [str(d) for d in sharded.devices]})
    for method in ("ROME", "MEMIT", "AlphaEdit", "KN", "FT-L", "T-Patcher", "CaliNET", "GRACE", "MEND", "KE"):
        try:
            results = []
            for handle in (single, sharded):
                session = EditSession(handle)
                session.apply(method, [REQUEST], hparams_for(method, handle, editors))
                results.append(next_token_logprobs(session))
            gap = float((results[0] - results[1]).abs().max())
            record({"check": "sharded", "method": method, "ok": gap < 0.1, "max_logprob_gap": gap})
        except Exception as err:
            record({"check": "sharded", "method": method, "ok": False, "error": repr(err),
                    "trace": traceback.format_exc(limit=6)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu-check"))
    parser.add_argument("--skip-smollm2", action="store_true", help="leave out check 2")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        results.append(entry)
        shown = {k: v for k, v in entry.items() if k != "trace"}
        print(json.dumps(shown), flush=True)

    info = {"check": "machine", "ok": True, "device": args.device, "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        info["names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    record(info)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = tiny_llama_folder(root)
        check_methods(load_model(str(folder), device=args.device), root / "editors", record)
        if not args.skip_smollm2:
            check_smollm2(args.device, record)
        check_sharded(folder, root / "editors-sharded", record)
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r.get("ok") is False]
    print(f"{len(results)} checks, {len(failed)} failed; written to {args.out / 'gpu-check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
