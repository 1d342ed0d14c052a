"""The bundled demo model: a small GPT-2 trained on the fact base, built on first use.

No model can be downloaded here, so EditScope trains its own: a word-level tokenizer over the
fact base and corpus, and a GPT-2-architecture model taught every fact through the relation's
training templates (loss on the answer tokens) plus the corpus as plain language-model text.
Held-out templates are never trained on; they measure paraphrase generalisation.

The build is deterministic (fixed seeds, a fixed thread count) and cached in the user cache folder under
a key that hashes the data files, the config and this module's version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from editing.factbase import CORPUS_PATH, FACTBASE_PATH, FactBase, load_corpus, load_factbase
from editing.paths import cache_dir

BUILD_VERSION = 1
TRAIN_THREADS = 2
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"


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


def demo_model_dir(config: DemoConfig | None = None) -> Path:
    """The cache folder the demo model for ``config`` lives (or will live) in."""
    config = config or DemoConfig()
    return cache_dir("models") / f"demo-{_key(config, FACTBASE_PATH, CORPUS_PATH)}"


def ensure_demo_model(config: DemoConfig | None = None,
                      progress: Callable[[float, str], None] | None = None) -> Path:
    """Build the demo model unless it is cached; returns its folder (a HF model directory).

    A file lock makes concurrent processes wait for one build instead of racing.
    """
    config = config or DemoConfig()
    target = demo_model_dir(config)
    if (target / "report.json").exists():
        return target
    lock_path = target.with_suffix(".lock")
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not (target / "report.json").exists():
                build_demo_model(target, config, progress=progress)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


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


def build_demo_model(target: Path, config: DemoConfig = DemoConfig(),
                     progress: Callable[[float, str], None] | None = None,
                     factbase_path: Path = FACTBASE_PATH, corpus_path: Path = CORPUS_PATH) -> dict:
    """Train the demo model and save it (with ``report.json`` of its accuracy) into ``target``."""
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
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if progress:
            progress(1.0, "demo model ready")
        return report
    finally:
        torch.set_num_threads(threads)


def demo_report(config: DemoConfig | None = None) -> dict:
    """Accuracy figures and build facts of the (built) demo model."""
    return json.loads((ensure_demo_model(config) / "report.json").read_text())


if __name__ == "__main__":  # `python -m editing.demo`: build (or find) the demo model and report
    folder = ensure_demo_model()
    print(f"demo model: {folder}")
    print(json.dumps(demo_report(), indent=1))
