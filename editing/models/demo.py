"""The bundled demo model: a small GPT-2 trained on the fact base, built on first use.

No model can be downloaded here, so EditScope trains its own: a word-level tokenizer over the
fact base and corpus, and a GPT-2-architecture model taught every fact through the relation's
training templates (loss on the answer tokens) plus the corpus as plain language-model text.
Held-out templates are never trained on; they measure paraphrase generalisation.

The build is deterministic (fixed seeds, a fixed thread count) and cached in the user cache folder under
a key that hashes the data files, the config and this module's version.

The trained weights are also shipped in ``data/demo-model/`` (9 MB) with the key they were built
for and the SHA-256 of their parameters: on first use they are unpacked into the cache in about
a second instead of trained for 4–15 minutes, and every machine edits the very same model (float
reductions differ between CPUs, so a rebuild elsewhere may differ in the last bits). The shipped
copy is used only while its key matches the current data and config; otherwise the model is
trained. ``python -m editing.models.demo --verify`` retrains and compares with the shipped weights;
``--ship`` retrains and replaces them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from editing.storage.buildonce import ProgressFn, build_once
from editing.storage.factbase import CORPUS_PATH, FACTBASE_PATH, FactBase, load_corpus, load_factbase
from editing.storage.files import atomic_write_text
from editing.storage.paths import DATA_DIR, cache_dir

BUILD_VERSION = 1
TRAIN_THREADS = 2
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
#: the trained demo model shipped with the code, and the record of what it was built for
SHIPPED_DIR = DATA_DIR / "demo-model"
SHIPPED_RECORD = "build.json"


@dataclass(frozen=True)
class DemoConfig:
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 64
    steps: int = 1600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    corpus_fraction: float = 0.06  # share of each batch that is corpus text
    seed: int = 0


def _key(config: DemoConfig, factbase: Path, corpus: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update(factbase.read_bytes())
    digest.update(corpus.read_bytes())
    digest.update(f"v{BUILD_VERSION}".encode())
    return digest.hexdigest()[:12]


def demo_key(config: DemoConfig | None = None) -> str:
    """The cache key of the demo model for ``config`` (data files, config and build version)."""
    return _key(config or DemoConfig(), FACTBASE_PATH, CORPUS_PATH)


def demo_model_dir(config: DemoConfig | None = None) -> Path:
    """The cache folder the demo model for ``config`` lives (or will live) in."""
    return cache_dir("models") / f"demo-{demo_key(config)}"


def demo_is_built(config: DemoConfig | None = None) -> bool:
    """Whether the demo model for ``config`` is in the cache (loading it then takes a second)."""
    return (demo_model_dir(config) / "report.json").exists()


def shipped_record() -> dict | None:
    """What the shipped weights were built for (``key``, ``weights_sha256``, ...), or None."""
    try:
        return json.loads((SHIPPED_DIR / SHIPPED_RECORD).read_text())
    except (OSError, ValueError):
        return None


def ensure_demo_model(config: DemoConfig | None = None, progress: ProgressFn | None = None) -> Path:
    """The demo model's folder (a HF model directory), unpacked or built first unless cached.

    The shipped weights are unpacked when they were built for this key; otherwise the model is
    trained. Concurrent processes wait for one build (and relay its progress, see
    :func:`editing.storage.buildonce.build_once`) instead of racing.
    """
    config = config or DemoConfig()
    key = demo_key(config)
    record = shipped_record()

    def build(folder: Path, report: ProgressFn) -> None:
        if record is not None and record.get("key") == key:
            report(0.5, "unpacking the shipped demo model")
            for item in SHIPPED_DIR.iterdir():
                if item.name != SHIPPED_RECORD:
                    shutil.copy2(item, folder / item.name)
        else:
            train_demo_model(folder, config, progress=report)

    return build_once(demo_model_dir(config), build, what="the demo model", marker="report.json", progress=progress)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and exact bytes (tied weights counted once)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(factbase: FactBase, corpus: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace and punctuation split) over every word in the data."""
    splitter = pre_tokenizers.Whitespace()
    texts: list[str] = list(corpus)
    for rel in factbase.relations.values():
        texts.extend(rel.train_templates + rel.heldout_templates + (rel.question,))
    for comp in factbase.compositions:
        texts.extend(comp.templates)
    for fact in factbase.facts:
        texts.extend((fact.subject, fact.object))
    words: dict[str, None] = {}
    for text in texts:
        for word, _span in splitter.pre_tokenize_str(text.replace("{}", " ")):
            words[word] = None
    vocab = {EOS: 0, PAD: 1, UNK: 2}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="right",
                                   clean_up_tokenization_spaces=False)


# -- training data -----------------------------------------------------------------------------
def fact_examples(factbase: FactBase, tokenizer: PreTrainedTokenizerFast,
                  heldout: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) for every fact under every train (or held-out) template."""
    examples = []
    for fact in factbase.facts:
        rel = factbase.relations[fact.relation]
        for template in rel.heldout_templates if heldout else rel.train_templates:
            prompt = template.replace("{}", fact.subject)
            examples.append((tokenizer(prompt)["input_ids"], tokenizer(" " + fact.object)["input_ids"]))
    return examples


def _make_batch(examples: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        seq = prompt + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt): len(seq)] = torch.tensor(answer)
    return ids, mask, labels


def _answer_loss(model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on labelled positions only: the LM head runs just where a loss is taken,
    which is most of the saving on a vocabulary this large relative to the model."""
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits, targets[rows, cols])


@torch.no_grad()
def first_token_accuracy(model: GPT2LMHeadModel, examples: list[tuple[list[int], list[int]]],
                         pad: int, batch_size: int = 512) -> float:
    """Share of examples whose answer's first token is the greedy prediction after the prompt."""
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        prompts = [(p, []) for p, _ in chunk]
        ids, mask, _ = _make_batch(prompts, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        predicted = logits[torch.arange(len(chunk)), last].argmax(-1)
        correct += sum(int(p) == a[0] for p, (_, a) in zip(predicted.tolist(), chunk, strict=True))
    return correct / max(1, len(examples))


def train_demo_model(folder: Path, config: DemoConfig = DemoConfig(), progress: ProgressFn | None = None,
                     factbase_path: Path = FACTBASE_PATH, corpus_path: Path = CORPUS_PATH) -> dict:
    """Train the demo model and save it (with ``report.json`` of its accuracy) into ``folder``.

    The folder is written in place: callers that need it to appear whole build into a temporary
    folder (:func:`ensure_demo_model` does, through :func:`editing.storage.buildonce.build_once`).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # a fixed thread count keeps float reductions reproducible
    try:
        factbase = load_factbase(factbase_path)
        corpus = load_corpus(corpus_path)
        tokenizer = build_tokenizer(factbase, corpus)
        pad = tokenizer.pad_token_id
        train = fact_examples(factbase, tokenizer)
        heldout = fact_examples(factbase, tokenizer, heldout=True)
        corpus_examples = []
        for line in corpus:
            ids = tokenizer(line)["input_ids"][: config.n_positions - 1]
            corpus_examples.append(([tokenizer.eos_token_id], ids))
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        ))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                       pct_start=0.05)
        n_corpus = int(config.batch_size * config.corpus_fraction) if corpus_examples else 0
        rng = random.Random(config.seed)
        bar = tqdm(range(config.steps), desc="Building the demo model", unit="step", leave=False)
        model.train()
        for step in bar:
            batch = rng.sample(train, config.batch_size - n_corpus)
            batch += rng.sample(corpus_examples, min(n_corpus, len(corpus_examples)))
            loss = _answer_loss(model, *_make_batch(batch, pad))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if progress:
                    progress(step / config.steps, f"training the demo model: step {step}, loss {loss.item():.3f}")
        model.eval()
        report = {
            "train_first_token_accuracy": first_token_accuracy(model, train, pad),
            "heldout_first_token_accuracy": first_token_accuracy(model, heldout, pad),
            "n_facts": len(factbase.facts),
            "n_subjects": len(factbase.subjects),
            "n_relations": len(factbase.relations),
            "n_train_examples": len(train),
            "n_heldout_examples": len(heldout),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - started, 1),
            "config": asdict(config),
            "factbase_digest": factbase.digest,
        }
        report["weights_sha256"] = weights_sha256(model)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=1))  # written last: marks a whole build
        return report
    finally:
        torch.set_num_threads(threads)


def demo_report(config: DemoConfig | None = None) -> dict:
    """Accuracy figures and build facts of the (built) demo model."""
    return json.loads((ensure_demo_model(config) / "report.json").read_text())


def ship_demo_model(config: DemoConfig | None = None) -> dict:
    """Train the demo model and replace the shipped copy in ``data/demo-model/`` with it."""
    config = config or DemoConfig()
    with tempfile.TemporaryDirectory() as tmp:
        report = train_demo_model(Path(tmp) / "model", config)
        staging = SHIPPED_DIR.with_name(SHIPPED_DIR.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(tmp) / "model", staging)
    record = {"key": demo_key(config), "weights_sha256": report["weights_sha256"],
              "build_seconds": report["build_seconds"], "torch": torch.__version__}
    atomic_write_text(staging / SHIPPED_RECORD, json.dumps(record, indent=1))
    shutil.rmtree(SHIPPED_DIR, ignore_errors=True)
    staging.rename(SHIPPED_DIR)
    return record


def verify_shipped(config: DemoConfig | None = None) -> dict:
    """Retrain the demo model in a temporary folder and compare it with the shipped weights."""
    config = config or DemoConfig()
    record = shipped_record() or {}
    with tempfile.TemporaryDirectory() as tmp:
        report = train_demo_model(Path(tmp) / "model", config)
    return {"shipped_key": record.get("key"), "current_key": demo_key(config),
            "shipped_sha256": record.get("weights_sha256"), "rebuilt_sha256": report["weights_sha256"],
            "identical": record.get("weights_sha256") == report["weights_sha256"],
            "rebuilt_train_accuracy": report["train_first_token_accuracy"],
            "rebuilt_heldout_accuracy": report["heldout_first_token_accuracy"],
            "build_seconds": report["build_seconds"]}


def _print_progress(fraction: float, message: str) -> None:
    print(f"[{fraction:4.0%}] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m editing.models.demo [--verify | --ship]`: find (unpack or build) the demo model and report."""
    parser = argparse.ArgumentParser(prog="python -m editing.models.demo", description=main.__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--verify", action="store_true", help="retrain and compare with the shipped weights")
    action.add_argument("--ship", action="store_true", help="retrain and replace the shipped weights")
    args = parser.parse_args(argv)
    if args.verify:
        print(json.dumps(verify_shipped(), indent=1))
    elif args.ship:
        print(json.dumps(ship_demo_model(), indent=1))
    else:
        started = time.perf_counter()
        folder = ensure_demo_model(progress=_print_progress)
        print(f"demo model: {folder} ({time.perf_counter() - started:.1f} s)")
        print(json.dumps(demo_report(), indent=1))


if __name__ == "__main__":
    main()
