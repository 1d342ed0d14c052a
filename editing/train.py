"""Training entry point for the learned editors (MEND, KE, SERAC, ...).

``python -m editing.train METHOD --model demo [--steps N] [--seed S]`` trains the method's
learned parts and caches the checkpoint under the user cache, keyed by model and config.
Each learned method registers a :class:`Trainer` here with :func:`register_trainer`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing.factbase import FactBase, load_factbase
from editing.paths import cache_dir
from editing.request import EditRequest

if TYPE_CHECKING:
    from editing.models import ModelHandle


@dataclass(frozen=True)
class EditRecord:
    """A counterfactual edit with its probes, for training and evaluating learned editors.

    ``paraphrases`` use the relation's held-out templates only for the ``heldout`` split, so an
    editor is never trained on the templates it is evaluated with.
    """

    request: EditRequest
    paraphrases: tuple[str, ...]  # filled prompts that should now answer target_new
    locality: tuple[tuple[str, str], ...]  # (filled prompt, its true answer) that must not change


def edit_records(split: str = "train", factbase: FactBase | None = None, seed: int = 0,
                 n_locality: int = 2) -> list[EditRecord]:
    """Counterfactual edit records built from the fact base, deterministic given ``seed``.

    Facts are split by subject (every 5th subject is held out), so ``heldout`` records are
    edits of subjects whose edits the editor never saw in training. The new target is another
    object of the same relation; paraphrases fill the relation's other templates.
    """
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'.")
    factbase = factbase or load_factbase()
    rng = random.Random(seed)
    subjects = factbase.subjects
    heldout_subjects = set(subjects[4::5])
    objects_by_relation: dict[str, list[str]] = {}
    for fact in factbase.facts:
        objects_by_relation.setdefault(fact.relation, [])
        if fact.object not in objects_by_relation[fact.relation]:
            objects_by_relation[fact.relation].append(fact.object)
    records = []
    for fact in factbase.facts:
        if (fact.subject in heldout_subjects) != (split == "heldout"):
            continue
        relation = factbase.relations[fact.relation]
        candidates = [o for o in objects_by_relation[fact.relation] if o != fact.object]
        if not candidates:
            continue
        new_object = rng.choice(candidates)
        templates = list(relation.train_templates)
        prompt = templates[rng.randrange(len(templates))]
        para_templates = relation.heldout_templates if split == "heldout" else \
            tuple(t for t in templates if t != prompt)[:3]
        others = [f for f in factbase.facts if f.subject != fact.subject]
        locality = []
        for other in rng.sample(others, n_locality):
            other_template = factbase.relations[other.relation].train_templates[0]
            locality.append((other_template.replace("{}", other.subject), other.object))
        records.append(EditRecord(
            request=EditRequest(prompt, fact.subject, new_object, fact.object),
            paraphrases=tuple(t.replace("{}", fact.subject) for t in para_templates),
            locality=tuple(locality),
        ))
    return records


@dataclass
class Trainer:
    """How to train one method's editor.

    ``train(handle, config, checkpoint_dir, progress) -> dict`` writes the checkpoint files into
    ``checkpoint_dir`` (resuming from what is there) and returns a JSON-serialisable report.
    """

    method: str
    default_config: Callable[[ModelHandle], dict[str, Any]]
    train: Callable[[ModelHandle, dict[str, Any], Path, Callable[[float, str], None]], dict[str, Any]]


TRAINERS: dict[str, Trainer] = {}


def register_trainer(trainer: Trainer) -> Trainer:
    TRAINERS[trainer.method] = trainer
    return trainer


def checkpoint_dir(handle: ModelHandle, method: str, config: dict[str, Any]) -> Path:
    """Cache folder of ``method``'s editor for this model and config."""
    key = hashlib.sha256(json.dumps([handle.fingerprint(), method, config], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    return cache_dir("editors", method.lower()) / key


def trained_checkpoint(handle: ModelHandle, method: str, config: dict[str, Any] | None = None) -> Path | None:
    """The finished checkpoint folder (with ``report.json``) or None when not trained yet."""
    trainer = TRAINERS.get(method)
    if trainer is None:
        return None
    config = config or trainer.default_config(handle)
    folder = checkpoint_dir(handle, method, config)
    return folder if (folder / "report.json").exists() else None


def train_editor(handle: ModelHandle, method: str, overrides: dict[str, Any] | None = None,
                 progress: Callable[[float, str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or resume, or find cached) ``method``'s editor; returns (checkpoint folder, report)."""
    import editing.methods  # noqa: F401  (registers the trainers)

    if method not in TRAINERS:
        raise KeyError(f"No trainer for {method!r}; trainable methods: {', '.join(sorted(TRAINERS))}.")
    trainer = TRAINERS[method]
    config = {**trainer.default_config(handle), **(overrides or {})}
    folder = checkpoint_dir(handle, method, config)
    if (folder / "report.json").exists():
        return folder, json.loads((folder / "report.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    report = trainer.train(handle, config, folder, progress or (lambda _f, _m: None))
    tmp = folder / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(folder / "report.json")
    return folder, report


def main(argv: list[str] | None = None) -> int:
    import editing.methods  # noqa: F401

    parser = argparse.ArgumentParser(prog="python -m editing.train", description=__doc__.splitlines()[0])
    parser.add_argument("method", help=f"one of: {', '.join(sorted(TRAINERS)) or '(none registered)'}")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config value (JSON value)")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from editing.models import load_model

    handle = load_model(args.model)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    bar = tqdm(total=100, desc=f"training {args.method}")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(100 * fraction)
        bar.set_postfix_str(message[:60])
        bar.refresh()

    folder, report = train_editor(handle, args.method, overrides, progress)
    bar.close()
    print(f"checkpoint: {folder}")
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
