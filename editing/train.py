"""Training entry point for the learned editors (MEND, KE, SERAC, ...).

``python -m editing.train METHOD --model demo [--steps N] [--seed S] [--data FILE]`` trains the
method's learned parts and caches the checkpoint under the user cache, keyed by model and config.
Training is deterministic given the seed (fixed thread count, seeded data order) and resumable:
an interrupted run continues from its last checkpoint when started again with the same config.
Each learned method registers a :class:`Trainer` here with :func:`register_trainer`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editing.core.request import EditRequest
from editing.learning.training import CHECKPOINT_FORMAT
from editing.methods.patching import in_training_memory
from editing.storage.factbase import Fact, FactBase, Relation, load_factbase
from editing.storage.files import atomic_write_text
from editing.storage.paths import cache_dir

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle


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

    Locality facts follow the fact base's split between training memory and probes
    (:func:`editing.methods.patching.in_training_memory`): those of ``train`` records are about
    memory-side subjects of the training split, those of ``heldout`` records about probe-side
    subjects, where :mod:`eval.probes` draws neighbours and unrelated facts. So no editor is
    trained to keep a fact that any evaluation probes, nor any fact of a held-out subject.
    """
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'.")
    return list(_edit_records(split, factbase or load_factbase(), seed, n_locality))


@lru_cache(maxsize=16)
def _edit_records(split: str, factbase: FactBase, seed: int, n_locality: int) -> tuple[EditRecord, ...]:
    # Cached: building the records scans the fact base once per fact (about half a second).
    rng = random.Random(seed)
    subjects = factbase.subjects
    heldout_subjects = set(subjects[4::5])
    if split == "train":
        kept_facts = [f for f in factbase.facts if f.subject not in heldout_subjects and in_training_memory(f.subject)]
    else:
        kept_facts = [f for f in factbase.facts if not in_training_memory(f.subject)]
    records = []
    for fact in factbase.facts:
        if (fact.subject in heldout_subjects) != (split == "heldout"):
            continue
        relation = factbase.relations[fact.relation]
        candidates = [o for o in factbase.objects_of(fact.relation) if o != fact.object]
        if not candidates:
            continue
        new_object = rng.choice(candidates)
        templates = list(relation.train_templates)
        prompt = templates[rng.randrange(len(templates))]
        para_templates = relation.heldout_templates if split == "heldout" else \
            tuple(t for t in templates if t != prompt)[:3]
        # Drawn only so that every record's new target and prompt stay what they were before the
        # locality facts followed the memory split: the held-out records are evaluation cases
        # (``eval run --data demo``) whose figures are compared across versions.
        rng.sample(range(len(factbase.facts) - len(factbase.facts_about(fact.subject))), n_locality)
        others = [f for f in kept_facts if f.subject != fact.subject]
        local_rng = random.Random(f"{seed}|locality|{fact.subject}|{fact.relation}")
        locality = []
        for other in local_rng.sample(others, min(n_locality, len(others))):
            other_template = factbase.relations[other.relation].train_templates[0]
            locality.append((other_template.replace("{}", other.subject), other.object))
        records.append(EditRecord(
            request=EditRequest(prompt, fact.subject, new_object, fact.object),
            paraphrases=tuple(t.replace("{}", fact.subject) for t in para_templates),
            locality=tuple(locality),
        ))
    return tuple(records)


def _subject_heldout(subject: str) -> bool:
    # Stable across processes (unlike hash()): about every 5th subject is held out.
    return int(hashlib.sha256(subject.encode()).hexdigest(), 16) % 5 == 0


def load_record_file(path: str | Path, split: str = "train") -> list[EditRecord]:
    """Edit records from a JSON Lines file, one record a line::

        {"prompt": "The capital of {} is", "subject": "France", "target_new": "Lyon",
         "target_true": "Paris", "paraphrases": ["France's capital is"],
         "locality": [["The capital of Spain is", "Madrid"]]}

    Records are split by subject like :func:`edit_records` (about one subject in five held out).
    """
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'.")
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            request = EditRequest(raw["prompt"], raw["subject"], raw["target_new"], raw.get("target_true"))
            locality = tuple((str(p), str(a)) for p, a in raw.get("locality", []))
            paraphrases = tuple(str(p) for p in raw.get("paraphrases", []))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}, record {number}: {err!r} (fields: prompt, subject, target_new, "
                             f"target_true, paraphrases, locality)") from err
        if not locality:
            raise ValueError(f"{path}, record {number}: 'locality' needs at least one [prompt, answer] pair.")
        if _subject_heldout(request.subject) == (split == "heldout"):
            records.append(EditRecord(request, paraphrases, locality))
    return records


def record_file_factbase(path: str | Path) -> FactBase:
    """The fact base a record file implies, for trainers that need relations beside the records
    (SERAC's hard negatives and alternative targets): one relation per edit-prompt template, its
    facts the true facts ``(subject, template, target_true)`` of every record of both splits.

    A template is the only thing a record says about its relation, so two relations sharing a
    template would be one here; records without ``target_true`` add no fact.
    """
    records = load_record_file(path, "train") + load_record_file(path, "heldout")
    templates = list(dict.fromkeys(r.request.prompt for r in records))
    relations = {t: Relation(t, "", "", (t,), (), t) for t in templates}
    facts = list(dict.fromkeys(Fact(r.request.subject, r.request.prompt, r.request.target_true)
                               for r in records if r.request.target_true is not None))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return FactBase(relations, facts, [], digest)


def training_records(config: dict[str, Any], split: str = "train") -> list[EditRecord]:
    """The records a learned editor trains (``train``) or is evaluated (``heldout``) on:
    ``config["data"]`` names a JSON Lines file of records, or is empty for the bundled fact base."""
    data = config.get("data") or ""
    return load_record_file(data, split) if data else edit_records(split)


@dataclass
class Trainer:
    """How to train one method's editor.

    ``train(handle, config, checkpoint_dir, progress) -> dict`` writes the checkpoint files into
    ``checkpoint_dir`` (resuming from what is there) and returns a JSON-serialisable report.
    """

    method: str
    default_config: Callable[[ModelHandle], dict[str, Any]]
    train: Callable[[ModelHandle, dict[str, Any], Path, Callable[[float, str], None]], dict[str, Any]]
    #: overrides for a training of a few steps, seconds long: an editor that runs (for timing it
    #: and for failure-handling checks on tiny random models), not one that edits well
    quick: dict[str, Any] = field(default_factory=dict)


TRAINERS: dict[str, Trainer] = {}


def register_trainer(trainer: Trainer) -> Trainer:
    TRAINERS[trainer.method] = trainer
    return trainer


#: environment variable naming the folder of trained editors (default: ``<user cache>/editors``)
EDITORS_ENV = "EDITSCOPE_EDITORS"


#: version of what editors train on beyond their config (:func:`edit_records`, the memory split):
#: part of every checkpoint's key, so editors trained on older data are not taken for the default.
#: 2: locality facts, SERAC's records and MEND's and KE's neighbours only from the training memory
RECORDS_VERSION = 2


def checkpoint_dir(handle: ModelHandle, method: str, config: dict[str, Any]) -> Path:
    """Cache folder of ``method``'s editor for this model and config (and data file contents,
    :data:`RECORDS_VERSION` and the checkpoint layout's :data:`editing.learning.training.CHECKPOINT_FORMAT`)."""
    parts: list[Any] = [handle.fingerprint(), method, config, RECORDS_VERSION, CHECKPOINT_FORMAT]
    data = config.get("data")
    if data and Path(data).is_file():  # a changed data file must not find the old editor
        parts.append(hashlib.sha256(Path(data).read_bytes()).hexdigest())
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return editors_root(method) / key


def editors_root(method: str) -> Path:
    """The cache folder holding ``method``'s trained editors (``$EDITSCOPE_EDITORS`` overrides)."""
    root = os.environ.get(EDITORS_ENV)
    return Path(root) / method.lower() if root else cache_dir("editors", method.lower())


#: written by :func:`train_editor` into every checkpoint folder: method, model fingerprint, config
EDITOR_META = "editor.json"
#: written last, when training has finished: the folder is then a usable editor
REPORT_FILE = "report.json"


def save_editor_meta(folder: Path, handle: ModelHandle, method: str, config: dict[str, Any]) -> None:
    """Record which model, method and config a checkpoint folder belongs to (checked before use)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "model": handle.fingerprint(), "config": config, "records": RECORDS_VERSION,
            "format": CHECKPOINT_FORMAT}
    atomic_write_text(folder / EDITOR_META, json.dumps(meta, indent=1, sort_keys=True, default=str))


def checkpoint_config(folder: Path) -> dict[str, Any]:
    """The training config a checkpoint folder was trained with."""
    meta = folder / EDITOR_META
    if meta.exists():
        return json.loads(meta.read_text())["config"]
    return json.loads((folder / "config.json").read_text())  # folders trained before editor.json existed


def checkpoint_problem(handle: ModelHandle, method: str, folder: Path,
                       finished: Sequence[str] = (REPORT_FILE,)) -> str | None:
    """None when ``folder`` holds a finished ``method`` editor for ``handle``'s model; else why not.

    ``finished``: the files that exist once the editor is usable (the report, written last, by
    default; a trainer that evaluates its editor before returning names what it saved).
    """
    meta_path = folder / EDITOR_META
    if not meta_path.exists() or not all((folder / name).exists() for name in finished):
        return f"{folder} holds no finished {method} editor (no {' and '.join([EDITOR_META, *finished])})."
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{meta_path} cannot be read ({err}); train the editor again."
    if not isinstance(meta, dict):
        return f"{meta_path} is not a checkpoint record; train the editor again."
    if meta.get("method") != method:
        return f"{folder} holds a {meta.get('method')} editor, not a {method} one."
    if meta.get("format", 1) != CHECKPOINT_FORMAT:  # its files are laid out otherwise: never misread them
        return (f"{folder} holds a {method} editor saved in checkpoint format {meta.get('format', 1)}, which this "
                f"version no longer reads (format {CHECKPOINT_FORMAT}); train the editor again.")
    if meta.get("model") != handle.fingerprint():
        return (f"The editor in {folder} was trained for {meta.get('model')}, "
                f"not for the loaded model {handle.fingerprint()}.")
    return None


def trained_checkpoints(handle: ModelHandle, method: str) -> list[Path]:
    """Every finished ``method`` editor for ``handle``'s model in the cache, newest first (the
    default config's and those trained with other settings)."""
    root = editors_root(method)
    if not root.is_dir():
        return []
    found = [folder for folder in root.iterdir()
             if folder.is_dir() and checkpoint_problem(handle, method, folder) is None]
    return sorted(found, key=lambda folder: (folder / REPORT_FILE).stat().st_mtime, reverse=True)


def trained_checkpoint(handle: ModelHandle, method: str, config: dict[str, Any] | None = None) -> Path | None:
    """The finished checkpoint folder (with ``report.json``) or None when not trained yet."""
    trainer = TRAINERS.get(method)
    if trainer is None:
        return None
    config = config or trainer.default_config(handle)
    folder = checkpoint_dir(handle, method, config)
    return folder if (folder / REPORT_FILE).exists() else None


TRAIN_THREADS = 1


@contextmanager
def deterministic_training(seed: int, threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Fixed seeds and thread count for the block (the same seed gives the same editor); the
    caller's thread count and random states are restored afterwards.

    One thread by default: on a shared 2-core machine a second thread made small training steps
    tens of times slower (the threads wait for each other), and any fixed count is deterministic.
    """
    previous_threads, python_state = torch.get_num_threads(), random.getstate()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)
        random.setstate(python_state)


def train_editor(handle: ModelHandle, method: str, overrides: dict[str, Any] | None = None,
                 progress: Callable[[float, str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train (or resume, or find cached) ``method``'s editor; returns (checkpoint folder, report).

    ``overrides`` change values of the method's default training config (and so the cache key).
    A file lock makes a second process wait for a running training of the same editor instead of
    racing it. Trainers hold the model's lock only while they touch the model (one step at a
    time), so edit sessions sharing the model keep working during a long training.
    """
    from editing.core.edit import handle_stack
    from editing.methods import import_all_methods

    import_all_methods()  # method modules register their trainers on import

    if method not in TRAINERS:
        raise KeyError(f"No trainer for {method!r}; trainable methods: {', '.join(sorted(TRAINERS))}.")
    if handle_stack(handle):
        raise RuntimeError("Editors are trained on the unedited model: revert the applied edits first.")
    trainer = TRAINERS[method]
    defaults = trainer.default_config(handle)
    unknown = set(overrides or {}) - set(defaults)
    if unknown:
        raise KeyError(f"Unknown {method} training settings {sorted(unknown)}; known: {sorted(defaults)}.")
    config = {**defaults, **(overrides or {})}
    folder = checkpoint_dir(handle, method, config)
    if (folder / REPORT_FILE).exists():
        return folder, json.loads((folder / REPORT_FILE).read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if (folder / REPORT_FILE).exists():  # trained by another process while we waited
                return folder, json.loads((folder / REPORT_FILE).read_text())
            save_editor_meta(folder, handle, method, config)
            with deterministic_training(int(config.get("seed", 0))):
                report = trainer.train(handle, config, folder, progress or (lambda _f, _m: None))
            atomic_write_text(folder / REPORT_FILE, json.dumps(report, indent=1, default=str))
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return folder, report


def main(argv: list[str] | None = None) -> int:
    from editing.methods import import_all_methods

    import_all_methods()  # method modules register their trainers on import

    parser = argparse.ArgumentParser(prog="python -m editing.train", description=__doc__.splitlines()[0])
    parser.add_argument("method", help=f"one of: {', '.join(sorted(TRAINERS)) or '(none registered)'}")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, help="training steps (default: the method's)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--data", help="JSON Lines file of edit records (default: the bundled fact base)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config value (JSON value)")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from editing.models.loader import load_model

    handle = load_model(args.model)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key in ("steps", "seed", "data"):
        if getattr(args, key) is not None:
            overrides[key] = str(Path(args.data).resolve()) if key == "data" else getattr(args, key)
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
    # Run the imported module's main: methods register their trainers in ``editing.train``,
    # not in this ``__main__`` copy of it.
    from editing.train import main as _main

    raise SystemExit(_main())
