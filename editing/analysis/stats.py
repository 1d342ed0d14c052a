"""Second-moment statistics of the MLP output projection's input, for ROME, MEMIT and AlphaEdit.

The statistic is the uncentred second moment ``C = E[k kᵀ]`` of the *input* of a block's MLP
output projection (the post-activation, ``d_ff``-wide vector), taken over every non-pad token of
a text corpus — what kmeng01/rome's ``layer_stats`` collects as ``mom2``. It is:

* collected for every requested layer in one pass, stopping the forward pass after the last
  needed layer (:func:`editing.core.hooks.forward_until`);
* accumulated in float64 (the matrix is badly conditioned) and stored as float32, like the
  reference's ``mom2_dtype: float32`` caches; consumers solve with it in float64;
* cached on disk under ``cache_dir("stats")``, keyed by the model, the layer, the corpus, the
  sample count and the maximum text length, and kept in memory once read.

Memory. One ``d_ff × d_ff`` float64 matrix, ``M = 8·d_ff²`` bytes, is the unit (float32: M/2):

========================  ======  =======  =========================================
model                     d_ff    M        float32 moment (disk, memory cache: M/2)
========================  ======  =======  =========================================
demo                      768     4.7 MB   2.4 MB
SmolLM2-135M              1,536   19 MB    9.4 MB
GPT-2 XL                  6,400   0.33 GB  0.16 GB
LLaMA-2-7B                11,008  0.97 GB  0.48 GB
LLaMA-3-8B, Mistral-7B    14,336  1.64 GB  0.82 GB
GPT-J-6B                  16,384  2.15 GB  1.07 GB
Qwen2-7B                  18,944  2.87 GB  1.44 GB
========================  ======  =======  =========================================

* collecting ``L`` layers: ``L·M`` of float64 running sums, plus per batch one float32 product
  (M/2) on the layer's device and the captured keys (tokens × d_ff per layer). The sums stay on
  their layer's device (each GPU's own layers, for a sharded model) when they fit in its free
  memory, else they go to host memory (:func:`accumulation_devices`; each batch's float32 product
  is then copied over, ~M/2 per layer and batch). Either way each product is added in float64,
  so the result is the same bit for bit. GPT-J's 6 MEMIT layers need 12.9 GB of sums: on the
  device of an 80 GB GPU beside the 12 GB bfloat16 model, in host memory on a 24 GB one;
* the moments returned are float32 on the CPU (``M/2`` per layer; at most
  :data:`MEMORY_BUDGET_BYTES` of them stay cached in memory);
* consumers move one to the device in float64 for a solve: ROME about 2M (``C`` and the
  solver's LU copy), MEMIT about 4M per layer (``C``, ``λC``, ``KKᵀ``, their sum, then the LU copy;
  6.6 GB on LLaMA-3-8B), AlphaEdit 2M plus its null-space basis (:mod:`editing.methods.alphaedit`).

Corpora (the ``corpus`` argument):

* ``"bundled"`` (the default for the demo model and the tiny test models, whose word-level
  vocabulary cannot spell other text): ``data/corpus.txt`` plus every fact of the bundled fact base written
  out under each of its relation's training templates ("The capital of France is Paris"). The
  reference uses 100,000 Wikipedia texts; the bundled corpus has ~13,000 short texts, and adding
  the filled fact templates makes the statistic cover the subject-position keys that edits write
  to (a simplification for the offline demo; pass a larger corpus for real models).
* ``"corpus"``: ``data/corpus.txt`` only.
* ``"prose"``: real English prose that is on every machine — the prose paragraphs of Python's own
  documentation (``pydoc_data.topics``, shipped with every CPython, PSF licence; grammar rules,
  tables and code examples dropped: 648 paragraphs, 34,000 SmolLM2 tokens) plus
  ``data/corpus.txt`` (542 hand-written encyclopedic sentences, 11,000 tokens). The default for
  every model whose tokenizer can spell open text (:func:`corpus_defaults`). Why this text: the reference samples
  Wikipedia, which cannot be downloaded here; a text corpus bundled in a PyPI package would be an
  extra install, and text the model writes itself would cost about as much compute to generate
  as the statistics themselves (several minutes for 10,000 tokens on two CPU cores), on the first
  edit. The documentation is people's prose, not filled fact templates, so the statistic
  describes the keys of ordinary text, as the method intends; its technical register is the
  price, measured acceptable on SmolLM2 (``scripts/smollm2_study.py``).
* a path to a text file: one text per non-empty line.
* ``"hf:<dataset>[:<config>[:<split>]]"``: a Hugging Face ``datasets`` corpus already in the local
  cache (its ``text`` column), e.g. ``"hf:wikitext:wikitext-103-raw-v1:train"``; needs the
  optional ``datasets`` package.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from editing.core.hooks import capture, forward_until
from editing.models.tokens import encode, pad_batch, pad_id
from editing.storage.factbase import CORPUS_PATH, load_corpus, load_factbase
from editing.storage.files import atomic_path
from editing.storage.paths import cache_dir

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

DEFAULT_CORPUS = "bundled"
DEFAULT_SAMPLES = 4000
#: the real-text corpus of models with an open vocabulary, and its sample count (texts; a prose
#: text is 38 SmolLM2 tokens on average). Chosen by the efficacy-against-sample-size study of
#: scripts/smollm2_study.py (ROME, 10 counterfactual edits on SmolLM2-135M, layer 11): 25 texts
#: (807 tokens, fewer than d_ff = 1536) break greedy efficacy (3/10) and neighbours (3/10); from
#: 100 texts (3,800 tokens) on, every count is the same as with 400 (efficacy 10/10, greedy
#: 10/10, paraphrase 6/10, neighbour kept 9/10), and so are 800 and all 1,190. 200 texts
#: (8,400 tokens, ~5 x d_ff) leave a margin at half the collection time of 400 — 0.2 % of the
#: reference's 100,000 samples.
PROSE_CORPUS = "prose"
PROSE_SAMPLES = 200
#: a sentence a closed word-level vocabulary cannot spell without unknown tokens
_OPEN_TEXT_PROBE = "Therefore, she quickly wrote eleven unusual words about zebras."
DEFAULT_MAX_LENGTH = 512
#: bytes of statistics kept in memory across calls (least recently used are dropped first)
MEMORY_BUDGET_BYTES = 4 * 2**30

ProgressFn = Callable[[float, str], None]


class StatsError(ValueError):
    """The statistics corpus cannot be read."""


@dataclass(frozen=True)
class StatsCorpus:
    """The texts statistics are collected over, and the id that keys their cache."""

    id: str
    texts: tuple[str, ...]


# -- corpora --------------------------------------------------------------------------------------
def short_digest(*parts: bytes | str) -> str:
    """A 12-hex-digit digest of some strings or bytes (cache keys)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def bundled_texts() -> list[str]:
    """``data/corpus.txt`` plus every fact written out under each training template."""
    factbase = load_factbase()
    texts = list(load_corpus())
    for fact in factbase.facts:
        for template in factbase.relations[fact.relation].train_templates:
            texts.append(f"{template.replace('{}', fact.subject)} {fact.object}")
    return texts


def prose_texts() -> list[str]:
    """The ``"prose"`` corpus: prose paragraphs of Python's documentation, then ``data/corpus.txt``.

    A paragraph is kept when none of its lines is indented (code, grammar continuations) or a
    heading underline, it holds no grammar rule, table or prompt, it has at least 8 words and at
    least 85 % letters and spaces; wrapped lines are joined and duplicates dropped.
    """
    import pydoc_data.topics  # part of the standard library; imported only when this corpus is used

    texts: list[str] = []
    seen: set[str] = set()
    for key in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = block.split("\n")
            if any(line.startswith(" ") or re.fullmatch(r"[*=~^+-]{3,}", line.strip()) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines).strip()
            if not text or any(mark in text for mark in ("::=", ">>>", "|", "+--")) or len(text.split()) < 8:
                continue
            if sum(ch.isalpha() or ch.isspace() for ch in text) < 0.85 * len(text) or text in seen:
                continue
            seen.add(text)
            texts.append(text)
    return texts + [text for text in load_corpus() if text not in seen]


def spells_open_text(handle: ModelHandle) -> bool:
    """Whether the model's tokenizer writes arbitrary English without unknown tokens (byte-level
    BPE, SentencePiece): False for the demo model's word-level vocabulary, which the tiny test
    models share."""
    tok = handle.tokenizer
    unk = tok.unk_token_id
    return unk is None or unk not in encode(tok, _OPEN_TEXT_PROBE)


def corpus_defaults(handle: ModelHandle) -> dict[str, str | int]:
    """Statistics corpus settings (``mom2_corpus``, ``mom2_n_samples``) for ``handle``'s method
    hyper-parameters: ``{}`` (the ``"bundled"`` corpus, 4,000 texts, unchanged) for closed
    vocabularies — the demo model, whose method tests compare with the references — and the
    ``"prose"`` corpus, :data:`PROSE_SAMPLES` texts, for real models."""
    if not spells_open_text(handle):
        return {}
    return {"mom2_corpus": PROSE_CORPUS, "mom2_n_samples": PROSE_SAMPLES}


def resolve_corpus(corpus: str | Path | None = None, n_samples: int = DEFAULT_SAMPLES,
                   seed: int = 0) -> StatsCorpus:
    """The first ``n_samples`` texts of ``corpus`` (see the module docstring for the forms).

    Local corpora are shuffled with a fixed seed first (the reference samples its Wikipedia
    texts at random), so a small sample still mixes prose and facts.
    """
    if n_samples < 1:
        raise StatsError("The statistics need at least one sample text.")
    spec = str(corpus) if corpus is not None else DEFAULT_CORPUS
    if spec.startswith("hf:"):
        return _hf_corpus(spec, n_samples)
    if spec == "bundled":
        texts = bundled_texts()
        source_id = "bundled-" + short_digest(load_factbase().digest, CORPUS_PATH.read_bytes())
    elif spec == PROSE_CORPUS:
        texts = prose_texts()
        source_id = "prose-" + short_digest(*texts)
    elif spec == "corpus":
        texts = load_corpus()
        source_id = "corpus-" + short_digest(CORPUS_PATH.read_bytes())
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise StatsError(
                f"Statistics corpus {spec!r} is neither 'bundled', 'corpus', 'prose', 'hf:<dataset>' nor a text file."
            )
        texts = load_corpus(path)
        source_id = f"file-{path.stem[:24]}-" + short_digest(path.read_bytes())
    if not texts:
        raise StatsError(f"Statistics corpus {spec!r} holds no text.")
    random.Random(seed).shuffle(texts)
    return StatsCorpus(id=f"{source_id}-s{seed}", texts=tuple(texts[:n_samples]))


def _hf_corpus(spec: str, n_samples: int) -> StatsCorpus:
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise StatsError(f"Corpus {spec!r} needs the `datasets` package (pip install datasets).") from err
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types; all mean "not available offline"
        raise StatsError(f"Could not load dataset {spec!r} from the local cache: {err}") from err
    if "text" not in data.column_names:
        raise StatsError(f"Dataset {spec!r} has no 'text' column (columns: {data.column_names}).")
    texts = []
    for text in data["text"]:
        if text and text.strip():
            texts.append(text.strip())
            if len(texts) >= n_samples:
                break
    if not texts:
        raise StatsError(f"Dataset {spec!r} holds no text.")
    return StatsCorpus(id="hf-" + short_digest(spec), texts=tuple(texts))


# -- cache keys -----------------------------------------------------------------------------------
def weights_digest(handle: ModelHandle, names: Sequence[str], n_values: int = 4096) -> str:
    """A cheap fingerprint of some parameters (their first ``n_values`` values).

    Distinguishes models that share a config (random tiny models, fine-tuned variants) without
    hashing gigabytes of weights.
    """
    digest = hashlib.sha256()
    for name in names:
        param = handle.parameter(name)
        digest.update(name.encode())
        digest.update(param.detach().reshape(-1)[:n_values].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def _layer_key_params(handle: ModelHandle, layer: int) -> list[str]:
    # The key at `layer` depends on everything below the MLP output projection; the embedding and
    # the layer's MLP input projections identify the model. Weight edits of ROME/MEMIT/AlphaEdit
    # change only MLP output projections, so statistics stay cached across a session's edits.
    names = [f"{handle.arch.embed}.weight"]
    names += [f"{handle.arch.module_name(layer, part)}.weight" for part in handle.arch.mlp_in]
    return names


def stats_path(handle: ModelHandle, layer: int, corpus: StatsCorpus, max_length: int,
               precision: torch.dtype = torch.float64) -> Path:
    """The cache file of one layer's statistic: a folder per model, a file per layer and corpus."""
    model_key = short_digest(handle.fingerprint(), weights_digest(handle, [f"{handle.arch.embed}.weight"]))
    layer_key = weights_digest(handle, _layer_key_params(handle, layer))[:8]
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in handle.name)[-40:]
    precision_tag = "f64" if precision == torch.float64 else "f32"
    name = f"{corpus.id}_n{len(corpus.texts)}_len{max_length}_{precision_tag}_L{layer}-{layer_key}.safetensors"
    return cache_dir("stats", f"{slug}-{model_key}") / name


_MEMORY: OrderedDict[str, torch.Tensor] = OrderedDict()


def _remember(key: str, moment: torch.Tensor) -> None:
    _MEMORY[key] = moment
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > 1 and sum(t.numel() * t.element_size() for t in _MEMORY.values()) > MEMORY_BUDGET_BYTES:
        _MEMORY.popitem(last=False)


def clear_memory_cache() -> None:
    """Forget statistics held in memory (files on disk stay)."""
    _MEMORY.clear()


# -- memory planning ------------------------------------------------------------------------------
#: the share of a device's free memory that planned allocations may take (the rest is left to
#: the allocator's fragmentation, activations and other sessions)
DEVICE_HEADROOM = 0.8


def free_device_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device in bytes; None where it is not known (CPU, MPS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def fits_on(device: torch.device | str, n_bytes: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``n_bytes`` of ``dtype`` tensors can be placed on ``device`` now: always on the CPU
    (host memory is the fallback), never float64 on MPS (it has none), on CUDA within
    :data:`DEVICE_HEADROOM` of the free memory."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "mps" and dtype == torch.float64:
        return False
    free = free_device_bytes(device)
    return free is not None and n_bytes <= DEVICE_HEADROOM * free


def accumulation_devices(handle: ModelHandle, layers: Sequence[int],
                         precision: torch.dtype = torch.float64) -> dict[int, torch.device]:
    """Where :func:`collect_second_moments` keeps each layer's running sum: on the device the layer
    runs on when that device's sums (plus one batch's float32 product) fit in its free memory, else
    the CPU. One device holds all of them or none; a model sharded by a ``device_map`` has each GPU
    hold the sums of its own layers."""
    d_ff = handle.d_ff
    itemsize = torch.empty((), dtype=precision).element_size()
    by_device: dict[torch.device, list[int]] = {}
    for layer in layers:
        by_device.setdefault(handle.module_device(handle.arch.mlp_out_name(layer)), []).append(layer)
    where: dict[int, torch.device] = {}
    for device, group in by_device.items():
        needed = len(group) * d_ff * d_ff * itemsize + d_ff * d_ff * 4
        place = device if fits_on(device, needed, precision) else torch.device("cpu")
        where.update(dict.fromkeys(group, place))
    return where


# -- collection -----------------------------------------------------------------------------------
@torch.no_grad()
def collect_second_moments(handle: ModelHandle, layers: Sequence[int], texts: Sequence[str],
                           max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 32,
                           precision: torch.dtype = torch.float64,
                           progress: ProgressFn | None = None,
                           accumulate_on: torch.device | str | None = None) -> tuple[dict[int, torch.Tensor], int]:
    """``E[k kᵀ]`` at each layer over every non-pad token of ``texts``, in one pass; no caching.

    Each batch's sum of outer products is taken in float32 on the layer's device and added to a
    running sum kept in ``precision`` (float64 by default) on ``accumulate_on`` (default:
    :func:`accumulation_devices`, each layer's device when the sums fit there, else the CPU; the
    result is the same bit for bit either way). Returns (layer -> ``(d_ff, d_ff)`` moment in
    ``precision`` on that device, token count). Memory: see the module docstring.
    """
    layers = sorted(set(layers))
    if not layers:
        raise ValueError("No layers to collect statistics for.")
    tok = handle.tokenizer
    names = {layer: handle.arch.mlp_out_name(layer) for layer in layers}
    seqs = [ids[:max_length] for ids in (encode(tok, text) for text in texts)]
    seqs = sorted((s for s in seqs if s), key=len)  # similar lengths batch with little padding
    if not seqs:
        raise StatsError("None of the statistics texts produced a token.")
    d_ff = handle.d_ff
    where = dict.fromkeys(layers, torch.device(accumulate_on)) if accumulate_on is not None else \
        accumulation_devices(handle, layers, precision)
    sums = {layer: torch.zeros(d_ff, d_ff, dtype=precision, device=where[layer]) for layer in layers}
    n_tokens = 0
    n_batches = (len(seqs) + batch_size - 1) // batch_size
    with capture(handle.model, names.values(), inputs=True) as store:
        for index, start in enumerate(range(0, len(seqs), batch_size)):
            batch = pad_batch(seqs[start: start + batch_size], pad_id(tok), handle.device)
            forward_until(handle.model, names[layers[-1]], **batch.model_inputs())
            mask = batch.attention_mask.bool()
            for layer, name in names.items():
                # One batch's products in float32 (a few thousand terms), the running sum in
                # `precision`: float64 accuracy over the corpus at float32 speed. The product is
                # taken where the layer's keys are (a device_map spreads layers over devices) and
                # moved as float32; add_ widens it there, exactly as `.to(precision)` would.
                keys = store[name][mask.to(store[name].device)].float()
                sums[layer].add_((keys.T @ keys).to(where[layer]))
            n_tokens += int(mask.sum())
            if progress is not None:
                progress((index + 1) / n_batches, f"second-moment statistics: batch {index + 1}/{n_batches}")
    return {layer: total.div_(n_tokens) for layer, total in sums.items()}, n_tokens  # in place: no second copy


def second_moments(handle: ModelHandle, layers: Sequence[int], corpus: str | Path | None = None,
                   n_samples: int = DEFAULT_SAMPLES, max_length: int | None = None, batch_size: int = 32,
                   precision: torch.dtype = torch.float64, progress: ProgressFn | None = None,
                   use_cache: bool = True) -> dict[int, torch.Tensor]:
    """The second moment ``E[k kᵀ]`` (float32, CPU, ``(d_ff, d_ff)``) of each layer's MLP key.

    Cached layers are read from disk (or memory); the missing ones are collected together in one
    pass over the corpus and saved.
    """
    layers = sorted(set(int(layer) for layer in layers))
    for layer in layers:
        if not 0 <= layer < handle.n_layers:
            raise ValueError(f"Layer {layer} does not exist; the model has layers 0..{handle.n_layers - 1}.")
    max_length = min(max_length or DEFAULT_MAX_LENGTH, handle.max_length)
    source = resolve_corpus(corpus, n_samples)
    paths = {layer: stats_path(handle, layer, source, max_length, precision) for layer in layers}
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer, path in paths.items():
        key = str(path)
        if use_cache and key in _MEMORY:
            _MEMORY.move_to_end(key)
            result[layer] = _MEMORY[key]
        elif use_cache and path.exists():
            result[layer] = load_file(str(path))["moment"]
            _remember(key, result[layer])
        else:
            missing.append(layer)
    if missing:
        moments, n_tokens = collect_second_moments(handle, missing, source.texts, max_length, batch_size,
                                                   precision, progress)
        for layer in missing:
            moment = moments[layer].float().cpu()
            result[layer] = moment
            if use_cache:
                path = paths[layer]
                with atomic_path(path) as tmp:  # a concurrent reader never sees half a file
                    save_file({"moment": moment.contiguous()}, str(tmp),
                              metadata={"n_tokens": str(n_tokens), "n_texts": str(len(source.texts)),
                                        "corpus": source.id, "model": handle.name, "layer": str(layer)})
                _remember(str(path), moment)
    elif progress is not None:
        progress(1.0, "second-moment statistics: cached")
    return result


def second_moment(handle: ModelHandle, layer: int, **kwargs) -> torch.Tensor:
    """:func:`second_moments` for one layer."""
    return second_moments(handle, [layer], **kwargs)[layer]
