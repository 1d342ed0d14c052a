"""Loading models into a :class:`ModelHandle`: the model, its tokenizer, its layout and a lock."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editing.core.concurrency import PriorityLock
from editing.models.arch import SUPPORTED_FAMILIES, ArchSpec, arch_for


class ModelNotFound(ValueError):
    """The model spec names nothing that can be loaded offline."""


@dataclass(eq=False)
class ModelHandle:
    """A loaded causal LM shared by every edit session of a process.

    The weights are never changed at rest: an :class:`~editing.core.session.EditSession` applies its
    edits while holding ``lock`` and reverts them before releasing it.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    name: str
    # interactive requests take it before background runs' next step (editing.core.concurrency)
    lock: PriorityLock = field(default_factory=PriorityLock, repr=False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's (the embeddings') device. With a ``device_map``
        over several devices the other layers may live elsewhere (:attr:`devices`)."""
        return next(self.model.parameters()).device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding parameters, in the order they first appear."""
        return list(dict.fromkeys(p.device for p in self.model.parameters()))

    def module_device(self, name: str) -> torch.device:
        """Where the named module runs: its first parameter's (or buffer's) device, else
        :attr:`device`. Differs from :attr:`device` for a model sharded by a ``device_map``."""
        module = self.module(name)
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return self.arch.d_model(self.model)

    @property
    def d_ff(self) -> int:
        return self.arch.d_ff(self.model)

    @property
    def max_length(self) -> int:
        config = self.model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    def module(self, name: str) -> torch.nn.Module:
        return self.arch.module(self.model, name)

    def parameter(self, name: str) -> torch.nn.Parameter:
        return self.model.get_parameter(name)

    def fingerprint(self) -> str:
        """Identifies the model for caches (statistics, trained editors)."""
        config = self.model.config
        return f"{self.name}|{config.model_type}|{self.n_layers}|{self.d_model}|{config.vocab_size}"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA if available, else MPS, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (AssertionError, RuntimeError):  # no CUDA build or no usable device
        return False


def default_gpu_dtype(device: torch.device) -> torch.dtype:
    """Half precision on a GPU: bfloat16 where the CUDA device supports it (Ampere and later; the
    exponent range of float32, so no overflow in activations), else float16 (older CUDA cards, MPS)."""
    if device.type == "cuda" and _bf16_supported():
        return torch.bfloat16
    return torch.float16


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU; on a GPU the requested dtype (float32, float16 or bfloat16), by default half
    precision (:func:`default_gpu_dtype`): a 7-8B model then takes 15-16 GB instead of 30.

    Edits stay exact in half precision: deltas are summed in float32 masters and rounded once
    (:mod:`editing.core.edit`).
    """
    if device.type == "cpu":
        return torch.float32
    if dtype is None:
        return default_gpu_dtype(device)
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(names)}.")
        return names[dtype]
    return dtype


DeviceMap = str | dict[str, int | str | torch.device]


def main_device(device_map: DeviceMap) -> torch.device:
    """The device that decides the default dtype of a ``device_map``: the first accelerator a dict
    names, else the CPU; for ``"auto"`` and the other strategies the best available device."""
    if isinstance(device_map, dict):
        for place in device_map.values():
            if isinstance(place, int):
                return torch.device("cuda", place)
            if str(place) not in ("cpu", "disk", "meta"):
                return torch.device(place)
        return torch.device("cpu")
    return pick_device(None)


def check_placement(model: PreTrainedModel, spec: str) -> None:
    """Refuse a model whose ``device_map`` offloaded weights (to CPU next to a GPU, or to disk):
    accelerate then keeps them outside the parameters (on the ``meta`` device) and moves them in
    for each forward pass, so an edit could not write them."""
    offloaded = sorted({name.rsplit(".", 1)[0] for name, param in model.named_parameters() if param.is_meta})
    if offloaded:
        shown = ", ".join(offloaded[:3]) + (f" and {len(offloaded) - 3} more" if len(offloaded) > 3 else "")
        raise ValueError(
            f"Loading {spec!r} with this device_map offloads weights ({shown}) that edits cannot write: "
            f"give it more device memory (max_memory), a half-precision dtype, or a device_map that places "
            f"every layer on a device.")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS where none) and pad on the right.

    Right padding keeps token positions identical to the unpadded prompt, which the
    position-indexed methods (ROME's subject token, scoring) rely on.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def handle_from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      name: str) -> ModelHandle:
    """Wrap an already-built model (tests, notebooks) in a handle; puts it in eval mode."""
    arch = arch_for(model)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return ModelHandle(model=model, tokenizer=prepare_tokenizer(tokenizer), arch=arch, name=name)


def _is_local_dir(spec: str) -> bool:
    """Whether ``spec`` names a local folder; False for names no file system accepts (too long, NUL)."""
    try:
        return Path(spec).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # ENAMETOOLONG, embedded NUL, unknown ~user
        return False


def load_model(spec: str, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None,
               progress: Callable[[float, str], None] | None = None,
               device_map: DeviceMap | None = None,
               max_memory: dict[int | str, int | str] | None = None) -> ModelHandle:
    """Load ``"demo"``, a pretrained short name (``"smollm2-135m"``, see
    :data:`editing.models.pretrained.PRETRAINED`), a local directory, or a Hugging Face id already in the
    local cache.

    The demo model is built and a pretrained model converted on first use (``progress`` reports
    that work). Never runs remote code and prefers safetensors weights.

    Placement: by default the whole model goes to ``device`` (:func:`pick_device`); on CUDA it is
    loaded straight onto the GPU (``device_map={"": device}``, no full copy in host memory first).
    ``device_map`` (``"auto"``, ``"balanced"``, ... through accelerate, or a dict module -> device)
    spreads the layers over several GPUs, ``max_memory`` capping each; ``device`` is then ignored.
    Edits apply each delta on its weight's device; a map that offloads weights to CPU or disk next
    to a GPU is refused (:func:`check_placement`). Precision: float32 on CPU, half precision by
    default on a GPU (:func:`pick_dtype`). transformers 5 always loads with low host memory
    (empty weights, then streamed shards): its ``low_cpu_mem_usage`` flag is gone.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ModelNotFound("No model given: use 'demo', a pretrained name such as 'smollm2-135m', "
                            "a local directory or a Hugging Face id.")
    dev = main_device(device_map) if device_map is not None else pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    placement: DeviceMap | None = device_map
    if placement is None and dev.type == "cuda":  # load the shards straight onto the GPU
        placement = {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    from editing.models.pretrained import PRETRAINED_NAMES
    from editing.prepare import prepare_model

    cached = prepare_model(spec, progress)  # the demo model or a converted pretrained one
    if cached is not None:
        source = str(cached)
        local_only = True
    elif _is_local_dir(spec):
        source = str(Path(spec).expanduser())
        local_only = True
    else:
        source = spec
        local_only = True  # no hub access at run time: only what is already cached
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only,
                                            trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"Could not find model {spec!r}: looked for a local directory of that name and for "
            f"a Hugging Face id in the local cache (no downloads happen at run time). "
            f"Download it first (e.g. `huggingface-cli download {spec}`) or pass a local path; "
            f"offline short names: 'demo', {', '.join(repr(n) for n in PRETRAINED_NAMES)}. "
            f"Supported families: {SUPPORTED_FAMILIES}."
        ) from err
    from editing.models.arch import ARCHITECTURES, UnsupportedArchitecture

    if config.model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"Model {spec!r} is a {config.model_type!r} model; EditScope supports "
            f"{SUPPORTED_FAMILIES}."
        )
    placement_kwargs: dict[str, object] = {}
    if placement is not None:
        placement_kwargs["device_map"] = placement
        if max_memory is not None:
            placement_kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=False, use_safetensors=None,
        dtype=torch_dtype, **placement_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only,
                                              trust_remote_code=False)
    if placement is None:
        model.to(dev)
    else:
        check_placement(model, spec)
    return handle_from_model(model, tokenizer, name=spec)
