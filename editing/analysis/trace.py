"""Causal tracing — ROME's "locate" step (Meng et al., 2022, section 2; kmeng01/rome
``experiments/causal_trace.py``).

The subject's token embeddings are corrupted with Gaussian noise, which destroys the model's
recall of the fact; then one hidden state at a time is restored to its clean value, and the
probability of the answer with that state restored (the indirect effect) shows where the fact
flows through the network:

* ``kind="block"``: the residual stream after each block, one (token, layer) state at a time;
* ``kind="mlp"`` / ``"attn"``: the MLP or attention outputs of a window of ``window`` layers
  centred on each layer, at one token (the reference's ``trace_important_window``).

The clean run and the ``n_samples`` corrupted runs share one batch: row 0 is clean and restored
states are copied from it. The noise is drawn once per call (seeded) and reused for every
restoration, as the reference does. Its default scale is 3 × the standard deviation of the token
embeddings of the bundled fact base's subjects (the reference uses its "known facts" subjects).

CLI: ``python -m editing.analysis.trace --model demo --prompt "The Eiffel Tower is located in"
--subject "Eiffel Tower" [--kind mlp|attn|block|all] [--out trace.json]`` prints a text heatmap.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editing.core.hooks import modify
from editing.models.tokens import encode, target_ids
from editing.storage.factbase import load_factbase

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

KINDS = ("block", "mlp", "attn")
NOISE_FACTOR = 3.0
#: most rows in one forward pass (clean row + restored corrupted copies)
MAX_ROWS = 256

ProgressFn = Callable[[float, str], None]


@dataclass
class TraceResult:
    """A causal-tracing heatmap: ``scores[token, layer]`` is P(answer) with that state restored."""

    scores: torch.Tensor  # (n_tokens, n_layers) float32
    tokens: list[str]
    subject_range: tuple[int, int]  # token indices [start, end)
    answer: str
    base_score: float  # clean P(answer)
    low_score: float  # corrupted P(answer), nothing restored
    kind: str
    window: int = 1  # layers restored together (kinds "mlp" and "attn")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"kind": self.kind, "tokens": self.tokens, "subject_range": list(self.subject_range),
                "answer": self.answer, "base_score": self.base_score, "low_score": self.low_score,
                "window": self.window, "scores": self.scores.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceResult:
        start, end = data["subject_range"]
        return cls(scores=torch.tensor(data["scores"], dtype=torch.float32), tokens=list(data["tokens"]),
                   subject_range=(int(start), int(end)), answer=data["answer"],
                   base_score=float(data["base_score"]), low_score=float(data["low_score"]), kind=data["kind"],
                   window=int(data.get("window", 1)))

    def render(self) -> str:
        """A text heatmap: one row per token (subject tokens starred), one column per layer."""
        shades = " ░▒▓█"
        top = max(float(self.scores.max()), self.base_score)
        span = max(top - self.low_score, 1e-12)
        labels = [("*" if self.subject_range[0] <= i < self.subject_range[1] else " ") + repr(t)[1:-1]
                  for i, t in enumerate(self.tokens)]
        width = max(len(label) for label in labels) + 1
        what = {"block": "residual stream after each block", "mlp": f"MLP outputs, window {self.window}",
                "attn": f"attention outputs, window {self.window}"}[self.kind]
        lines = [f"Causal trace ({what}) -> answer {self.answer!r}",
                 f"P(answer): clean {self.base_score:.3f}, subject corrupted {self.low_score:.3f}; "
                 f"cells: P(answer) with the state restored (* = subject token)",
                 " " * width + "".join(f"{f'L{layer}':>7}" for layer in range(self.scores.shape[1]))]
        for label, row in zip(labels, self.scores.tolist(), strict=True):
            cells = []
            for value in row:
                level = min(len(shades) - 1, max(0, int((value - self.low_score) / span * (len(shades) - 1) + 0.5)))
                cells.append(f"{value:6.3f}{shades[level]}")
            lines.append(label.ljust(width) + "".join(cells))
        return "\n".join(lines)


# -- inputs ---------------------------------------------------------------------------------------
def locate_subject(handle: ModelHandle, prompt: str, subject: str) -> tuple[str, list[int], tuple[int, int]]:
    """(filled text, its token ids, the subject's token range [start, end)).

    ``prompt`` holds the subject verbatim or ``{}`` where it goes.
    """
    if not subject.strip():
        raise ValueError("The subject is empty.")
    if "{}" in prompt:
        start_char = prompt.index("{}")
        text = prompt.replace("{}", subject, 1)
    elif subject in prompt:
        start_char = prompt.index(subject)
        text = prompt
    else:
        raise ValueError(f"The subject {subject!r} does not occur in the prompt {prompt!r}.")
    tok = handle.tokenizer
    ids = encode(tok, text)
    start = len(encode(tok, text[:start_char].rstrip()))
    end = len(encode(tok, text[: start_char + len(subject)]))
    start = min(start, len(ids) - 1)
    end = max(start + 1, min(end, len(ids)))
    return text, ids, (start, end)


_NOISE_LEVELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def embedding_noise_level(handle: ModelHandle) -> float:
    """3 × the standard deviation of the token embeddings of the fact base's subjects."""
    cached = _NOISE_LEVELS.get(handle)
    if cached is not None:
        return cached
    tok = handle.tokenizer
    ids = sorted({i for s in load_factbase().subjects for i in tok(s, add_special_tokens=False)["input_ids"]})
    embed = handle.module(handle.arch.embed)
    vectors = embed(torch.tensor(ids, device=handle.device)).float()
    level = NOISE_FACTOR * float(vectors.std())
    _NOISE_LEVELS[handle] = level
    return level


def _restore_hook(rows: torch.Tensor, cols: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        at_rows, at_cols = rows.to(out.device), cols.to(out.device)  # the module's device, if sharded
        out[at_rows, at_cols] = out[0, at_cols]  # row 0 is the clean run
        return out

    return restore


Restore = tuple[str, torch.Tensor, torch.Tensor]  # (module name, rows, token positions)


def _answer_probs(handle: ModelHandle, ids: list[int], n_rows: int, answer_id: int, noise: torch.Tensor,
                  subject_range: tuple[int, int], restores: list[Restore]) -> torch.Tensor:
    """P(answer) at the last position of each row of a batch of ``n_rows`` copies of ``ids``
    where rows 1.. have noisy subject embeddings and the listed module outputs restored."""
    start, end = subject_range
    batch = torch.tensor([ids] * n_rows, device=handle.device)

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        reps = (n_rows - 1) // noise.shape[0]
        x[1:, start:end] += noise.repeat(reps, 1, 1).to(x.device, x.dtype)
        return x

    with ExitStack() as stack:
        stack.enter_context(modify(handle.model, handle.arch.embed, corrupt))
        for name, rows, cols in restores:
            stack.enter_context(modify(handle.model, name, _restore_hook(rows, cols)))
        logits = handle.model(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)[:, answer_id]


def _module_names(handle: ModelHandle, layer: int, kind: str, window: int) -> list[str]:
    if kind == "block":
        return [handle.arch.block_name(layer)]
    low, high = max(0, layer - window // 2), min(handle.n_layers, layer - (-window // 2))
    name = handle.arch.mlp_name if kind == "mlp" else handle.arch.attn_name
    return [name(other) for other in range(low, high)]


@torch.no_grad()
def _trace(handle: ModelHandle, text: str, ids: list[int], subject_range: tuple[int, int], answer_id: int,
           answer: str, kind: str, n_samples: int, noise_level: float, window: int, seed: int,
           progress: ProgressFn) -> TraceResult:
    generator = torch.Generator().manual_seed(seed)
    start, end = subject_range
    noise = noise_level * torch.randn(n_samples, end - start, handle.d_model, generator=generator)
    noise = noise.to(handle.device)
    n_tokens, n_layers = len(ids), handle.n_layers
    clean = handle.model(input_ids=torch.tensor([ids], device=handle.device), use_cache=False,
                         logits_to_keep=1).logits[0, -1]
    base_score = float(torch.softmax(clean.float(), -1)[answer_id])
    low_score = float(_answer_probs(handle, ids, 1 + n_samples, answer_id, noise, subject_range, [])[1:].mean())
    scores = torch.zeros(n_tokens, n_layers)
    tokens_per_pass = max(1, (MAX_ROWS - 1) // n_samples)
    for layer in range(n_layers):
        names = _module_names(handle, layer, kind, window)
        for first in range(0, n_tokens, tokens_per_pass):
            token_ids = list(range(first, min(n_tokens, first + tokens_per_pass)))
            # rows 1 + g*S .. 1 + (g+1)*S - 1 restore token token_ids[g]
            rows = torch.arange(1, 1 + len(token_ids) * n_samples, device=handle.device)
            cols = torch.tensor(token_ids, device=handle.device).repeat_interleave(n_samples)
            probs = _answer_probs(handle, ids, 1 + len(rows), answer_id, noise, subject_range,
                                  [(name, rows, cols) for name in names])
            scores[first: first + len(token_ids), layer] = probs[1:].view(len(token_ids), n_samples).mean(1).cpu()
        progress((layer + 1) / n_layers, f"causal trace ({kind}): layer {layer + 1}/{n_layers}")
    tokens = [handle.tokenizer.decode([i]) for i in ids]
    return TraceResult(scores=scores, tokens=tokens, subject_range=subject_range, answer=answer,
                       base_score=base_score, low_score=low_score, kind=kind,
                       window=1 if kind == "block" else window)


def _resolve_answer(handle: ModelHandle, text: str, ids: list[int], answer: str | None) -> tuple[int, str]:
    if answer is not None and answer.strip():
        return target_ids(handle.tokenizer, text, answer)[0], answer.strip()
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([ids], device=handle.device), use_cache=False,
                              logits_to_keep=1).logits[0, -1]
    answer_id = int(logits.argmax())
    return answer_id, handle.tokenizer.decode([answer_id]).strip()


def default_window(n_layers: int) -> int:
    """The MLP/attention window for a model of ``n_layers`` layers: the reference's 10 on GPT-2 XL
    (48 layers), at most a quarter of a shallower model, so that neighbouring layers' windows
    still differ (with 10 on the 4-layer demo model every window covered every layer)."""
    return max(1, min(10, n_layers // 4))


def causal_trace(handle: ModelHandle, prompt: str, subject: str, answer: str | None = None, kind: str = "block",
                 n_samples: int = 10, noise: float | None = None, window: int | None = None, seed: int = 0,
                 progress: ProgressFn | None = None) -> TraceResult:
    """Trace how P(answer) after ``prompt`` depends on each (token, layer) state.

    ``answer`` defaults to the model's greedy next token; only its first token is scored.
    ``noise`` is the noise's standard deviation (default :func:`embedding_noise_level`);
    ``window`` the layers restored together for MLP/attention (default :func:`default_window`).
    """
    window = default_window(handle.n_layers) if window is None else window
    if kind not in KINDS:
        raise ValueError(f"Unknown trace kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if n_samples < 1 or window < 1:
        raise ValueError("n_samples and window must be at least 1.")
    with handle.lock:
        text, ids, subject_range = locate_subject(handle, prompt, subject)
        answer_id, answer_text = _resolve_answer(handle, text, ids, answer)
        level = embedding_noise_level(handle) if noise is None else float(noise)
        return _trace(handle, text, ids, subject_range, answer_id, answer_text, kind, n_samples, level, window,
                      seed, progress or (lambda _f, _m: None))


def trace_all(handle: ModelHandle, prompt: str, subject: str, answer: str | None = None,
              **kwargs: Any) -> dict[str, TraceResult]:
    """:func:`causal_trace` for the three kinds, with one answer (kind -> result)."""
    progress: ProgressFn = kwargs.pop("progress", None) or (lambda _f, _m: None)
    kwargs.pop("kind", None)
    results = {}
    with handle.lock:
        if answer is None:
            text, ids, _range = locate_subject(handle, prompt, subject)
            answer = _resolve_answer(handle, text, ids, None)[1]
        for index, kind in enumerate(KINDS):
            def kind_progress(fraction: float, message: str, _index: int = index) -> None:
                progress((_index + fraction) / len(KINDS), message)

            results[kind] = causal_trace(handle, prompt, subject, answer, kind=kind, progress=kind_progress, **kwargs)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: trace one prompt and print the heatmap(s)."""
    parser = argparse.ArgumentParser(prog="python -m editing.analysis.trace", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo', a local directory or a cached Hugging Face id")
    parser.add_argument("--prompt", required=True, help="the prompt, with the subject written in (or {})")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--answer", default=None, help="default: the model's greedy next token")
    parser.add_argument("--kind", default="block", choices=[*KINDS, "all"])
    parser.add_argument("--samples", type=int, default=10, help="corrupted runs averaged per cell")
    parser.add_argument("--noise", type=float, default=None, help="noise std (default 3 x embedding std)")
    parser.add_argument("--window", type=int, default=None,
                        help="layers restored together for MLP/attention (default: a quarter of the layers, "
                             "at most 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the result(s) as JSON")
    args = parser.parse_args(argv)
    from editing.models.loader import load_model

    handle = load_model(args.model)
    options = dict(n_samples=args.samples, noise=args.noise, window=args.window, seed=args.seed)
    try:
        if args.kind == "all":
            results = trace_all(handle, args.prompt, args.subject, args.answer, **options)
        else:
            results = {args.kind: causal_trace(handle, args.prompt, args.subject, args.answer, kind=args.kind,
                                               **options)}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n\n".join(result.render() for result in results.values()))
    if args.out is not None:
        payload = {k: r.to_dict() for k, r in results.items()} if args.kind == "all" else \
            results[args.kind].to_dict()
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
