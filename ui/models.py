"""The process-wide model cache: each model is loaded once and shared by every browser session.

The handle returned here is shared by all sessions and threads. Nothing in the UI changes its
weights: only an :class:`~editing.core.session.EditSession` does, inside ``session.active()``, under
the handle's lock, and it reverts before releasing the lock.
"""

from __future__ import annotations

import streamlit as st
import torch

from editing.models.demo import weights_sha256
from editing.models.loader import ModelHandle, load_model
from editing.prepare import model_is_prepared, prepare_model
from editing.storage.buildonce import BuildFailed
from ui.state import ModelChoice

DEMO = "demo"
DTYPES = ("float32", "bfloat16", "float16")
#: the layers spread over every visible GPU (``device_map="auto"``), for a model larger than one
ALL_GPUS = "all GPUs"


def device_options() -> list[str]:
    """Devices this machine offers ("auto" picks CUDA, then MPS, then CPU; "all GPUs" where there
    are several)."""
    options = ["auto", "cpu"]
    if torch.cuda.is_available():
        options.append("cuda")
        if torch.cuda.device_count() > 1:
            options.append(ALL_GPUS)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        options.append("mps")
    return options


def resolves_to_cpu(device: str) -> bool:
    """Whether ``device`` ends up on the CPU (where only float32 is used)."""
    return device == "cpu" or (device == "auto" and device_options() == ["auto", "cpu"])


@st.cache_data(ttl=60, show_spinner=False)
def cached_model_ids() -> list[str]:
    """Causal-LM ids already in the local Hugging Face cache (nothing is downloaded at run time)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache folder, unreadable cache: simply offer none
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")


@st.cache_resource(show_spinner=False, max_entries=2)
def _shared_handle(spec: str, device: str, dtype: str) -> ModelHandle:
    if device == ALL_GPUS:
        return load_model(spec, dtype=dtype, device_map="auto")
    return load_model(spec, device=None if device == "auto" else device, dtype=dtype)


def shared_handle(choice: ModelChoice) -> ModelHandle:
    """The shared handle for ``choice``, loaded on first use; shows progress while loading.

    Raises :class:`~editing.models.loader.ModelNotFound`, :class:`~editing.models.arch.UnsupportedArchitecture`
    or ``ValueError`` with a message for the person when the model cannot be loaded.
    """
    dtype = "float32" if resolves_to_cpu(choice.device) else choice.dtype
    if not model_is_prepared(choice.spec):
        _prepare_with_progress(choice.spec)
    with st.spinner(f"Loading {choice.spec}…"):
        return _shared_handle(choice.spec, choice.device, dtype)


def _prepare_with_progress(spec: str) -> None:
    """Build or convert ``spec``'s cached files with a live progress bar (first use only).

    The bar shows the build's own steps, or — while another process (another server, a test
    run, the CLI) builds the same files — "waiting for another process that is building …" with
    that build's progress. A failed build shows its error and a Retry button, and stops the page.
    """
    with st.status(f"Preparing {spec} — first use only", expanded=True) as status:
        bar = st.progress(0.0, text=f"preparing {spec}")
        try:
            prepare_model(spec, progress=lambda fraction, message: bar.progress(min(1.0, max(0.0, fraction)),
                                                                                text=message))
        except BuildFailed as err:
            status.update(label=f"Preparing {spec} failed", state="error", expanded=True)
            st.error(str(err))
            st.button("Retry", key=f"retry_prepare_{spec}", type="primary")  # a click reruns the page
            st.stop()
        status.update(label=f"{spec} ready", state="complete", expanded=False)


def weights_digest(handle: ModelHandle) -> str:
    """SHA-256 of every parameter's exact bytes, read under the model's lock (so never mid-edit).

    Two handles loaded from the same files give the same digest; an edit left in the weights
    would change it. Costs one pass over the weights (seconds for billions of parameters).
    """
    with handle.lock:
        return weights_sha256(handle.model)


def edits_at_rest(handle: ModelHandle) -> int:
    """How many edits the shared model holds while no session computes on it (always 0 when healthy)."""
    from editing.core.edit import handle_stack

    with handle.lock:
        return len(handle_stack(handle))
