"""The sidebar: model, device and precision; editing method and its hyper-parameters; this session's
edit stack (undo, redo, clear, save and load as a file).

It is rendered by app.py on every run, so its widgets keep their values on every page.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import streamlit as st

from editing.core.edit import EditError
from editing.core.safety import UnsafeInput
from editing.methods import available_methods, get_method
from editing.models.arch import UnsupportedArchitecture
from editing.models.loader import ModelHandle, ModelNotFound
from editing.models.pretrained import available_pretrained
from ui.actions import describe_edit, load_stack_archive, stack_archive
from ui.jobs import find_shared_task, shared_task, time_left
from ui.models import DEMO, DTYPES, cached_model_ids, device_options, resolves_to_cpu, shared_handle
from ui.state import AppState, Context, ModelChoice
from ui.widgets import error_message, hparam_inputs, show_error

CUSTOM = "Other: a local path or Hugging Face id…"
#: the model picked before the person chooses one (default: the bundled demo model)
DEFAULT_MODEL_ENV = "EDITSCOPE_DEFAULT_MODEL"
#: methods tried in this order when the sidebar first picks one
PREFERRED_METHODS = ("ROME", "FT-L", "MEMIT", "FT")
TRAINING_POLL_SECONDS = 2.0


def default_method(methods: list[str]) -> str | None:
    """The method picked before the person chooses one: ROME when available, else FT-L, else the first."""
    for name in PREFERRED_METHODS:
        if name in methods:
            return name
    return methods[0] if methods else None


def installed_pretrained() -> list[str]:
    """Short names of the pretrained models installed on this machine (SmolLM2 first); [] when none
    or when looking fails."""
    try:
        return list(available_pretrained())
    except Exception:  # a broken package must not take the sidebar down
        return []


def model_options(default_env: str, pretrained: list[str], cached: list[str]) -> list[str]:
    """The model picker's options, the default first: ``$EDITSCOPE_DEFAULT_MODEL`` when set, else an
    installed pretrained model (a real model is what the playground is for), else the demo model."""
    first = default_env.strip() or (pretrained[0] if pretrained else DEMO)
    return list(dict.fromkeys([first, *pretrained, DEMO, *cached, CUSTOM]))


def _model_section(state: AppState) -> Context:
    st.subheader("Model")
    options = model_options(os.environ.get(DEFAULT_MODEL_ENV, ""), installed_pretrained(), cached_model_ids())
    picked = st.selectbox("Model", options, key="sb_model",
                          help="A pretrained model installed here (e.g. SmolLM2-135M), the bundled demo model "
                               "(tiny, trained on the fact base), a model in your Hugging Face cache, or a local "
                               "folder.")
    spec = picked
    if picked == CUSTOM:
        spec = st.text_input("Local path or Hugging Face id", key="sb_model_custom",
                             placeholder="e.g. gpt2-xl or /models/pythia-1b").strip()
    devices = device_options()
    left, right = st.columns(2)
    device = left.selectbox("Device", devices, key="sb_device",
                            help="\"all GPUs\" spreads the model's layers over every GPU (for a model larger "
                                 "than one); edits then work on each layer where it lives.")
    cpu = resolves_to_cpu(device)
    dtype = right.selectbox("Precision", DTYPES, key="sb_dtype", disabled=cpu,
                            help="Models run in float32 on the CPU; half precision is offered on a GPU.")
    choice = ModelChoice(spec=spec, device=device, dtype="float32" if cpu else dtype)
    ctx = Context(model=choice)
    if not spec:
        ctx.model_error = "Type a local path or a Hugging Face id to load a model."
        st.info(ctx.model_error)
        return ctx
    try:
        ctx.handle = shared_handle(choice)
    except (ModelNotFound, UnsupportedArchitecture, ValueError, OSError) as err:
        ctx.model_error = error_message(err)
        show_error(err)
        return ctx
    handle = ctx.handle
    st.caption(f"{handle.arch.family} · {handle.n_layers} layers · d_model {handle.d_model} · "
               f"{sum(p.numel() for p in handle.model.parameters()) / 1e6:.1f} M parameters · "
               f"{' + '.join(str(d) for d in handle.devices) if len(handle.devices) > 1 else handle.device.type} · "
               f"{str(handle.dtype).removeprefix('torch.')}")
    return ctx


def _method_section(state: AppState, ctx: Context) -> None:
    st.subheader("Method")
    methods = available_methods()
    if not methods:
        st.warning("No editing method is registered yet.")
        return
    if st.session_state.get("sb_method") not in methods:
        st.session_state["sb_method"] = default_method(methods)
    name = st.selectbox("Editing method", methods, key="sb_method")
    method = get_method(name)
    ctx.method = method.name
    st.caption(f"{method.summary} *(edit kind: {method.edit_kind.replace('_', ' ')})*")
    handle = ctx.handle
    if handle is None:
        return
    readiness = st.container()  # above the hyper-parameters, which it depends on (a chosen editor)
    try:
        defaults = method.default_hparams(handle)
    except Exception as err:
        ctx.hparam_error = error_message(err)
        show_error(err)
        return
    ctx.hparams, ctx.hparam_error = hparam_inputs(defaults, f"hp|{ctx.model.key}|{method.name}",
                                                  n_layers=handle.n_layers)
    if "checkpoint" in {f.name for f in dataclasses.fields(defaults)}:
        chosen = _editor_choice(method.name, handle, f"hp|{ctx.model.key}|{method.name}|checkpoint")
        if chosen:
            ctx.hparams = {**ctx.hparams, "checkpoint": chosen}
    if ctx.hparams:
        st.caption("Changed: " + ", ".join(f"{k} = {v}" for k, v in ctx.hparams.items()))
    try:
        ctx.method_problem = method.readiness(handle, None if ctx.hparam_error else ctx.hparams)
    except Exception as err:  # a readiness check that fails is itself a reason not to edit
        ctx.method_problem = f"{method.name} cannot check whether it is ready: {error_message(err)}"
    if ctx.method_problem:
        with readiness:
            st.warning(ctx.method_problem)
            _train_button(method.name, handle, ctx.model.key)


def _editor_choice(method: str, handle: ModelHandle, key: str) -> str:
    """Pick one of the finished editors of ``method`` for this model; "" is the one trained with
    the default config (others come from ``python -m editing.train ... --set key=value``)."""
    from editing.train import TRAINERS, checkpoint_config, trained_checkpoint, trained_checkpoints

    defaults = TRAINERS[method].default_config(handle) if method in TRAINERS else {}
    default_folder = trained_checkpoint(handle, method)
    others = [str(folder) for folder in trained_checkpoints(handle, method) if folder != default_folder]
    if not others:
        return ""
    options = ["", *others]
    if st.session_state.get(key) not in options:  # a choice whose folder is gone
        st.session_state.pop(key, None)

    def label(folder: str) -> str:
        if not folder:
            return "trained with the default config"
        changed = {k: v for k, v in checkpoint_config(Path(folder)).items() if defaults.get(k) != v}
        return f"{Path(folder).name}: " + (", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "default")

    return st.selectbox("Trained editor", options, key=key, format_func=label,
                        help="Editors of this method trained for this model; the label lists the training "
                             "settings that differ from the defaults.")


def _train_button(method: str, handle: ModelHandle, model_key: str) -> None:
    """Offer to train a learned editor; training runs in the background, shared by every session."""
    from editing.methods import import_all_methods
    from editing.train import TRAINERS, train_editor

    import_all_methods()  # method modules register their trainers on import

    if method not in TRAINERS:
        return
    key = f"train|{model_key}|{method}"
    task = find_shared_task(key)
    if task is not None and not task.done:
        st.fragment(_training_progress, run_every=TRAINING_POLL_SECONDS)(key)
        return
    if task is not None and task.error is not None:
        st.error(f"Training {method} failed: {task.error}")
    if st.button(f"Train the {method} editor", key=f"sb_train_{method}",
                 help="Trains the learned editor on counterfactual edits from the fact base, in the background "
                      "(you can keep working); the checkpoint is cached for every session."):
        shared_task(key, f"training {method}", lambda progress: train_editor(handle, method, progress=progress))
        st.rerun()


def _training_progress(key: str) -> None:
    task = find_shared_task(key)
    if task is None:
        return
    if task.done:
        st.rerun(scope="app")  # the method is ready (or the failure is shown): redraw the sidebar
    st.progress(task.progress, text=f"{task.label}: {task.message}"[:180] + time_left(task.started_at, task.progress))


def _stack_section(state: AppState, ctx: Context) -> None:
    st.subheader("Your edits")
    session = state.current_session()
    if session is None:
        st.caption("Load a model to edit it.")
        return
    edits = session.edits
    if edits:
        st.markdown("\n".join(f"{i}. **{e.method}** — {describe_edit(e)}" for i, e in enumerate(edits, 1)))
    else:
        st.caption("No edits: the model answers as trained.")
    undo, redo, clear = st.columns(3)
    undo.button("Undo", key="sb_undo", disabled=not session.can_undo, on_click=session.undo,
                width="stretch", help="Take the last edit off your stack (it can be redone).")
    redo.button("Redo", key="sb_redo", disabled=not session.can_redo, on_click=session.redo, width="stretch")
    clear.button("Clear", key="sb_clear", disabled=not (session.can_undo or session.can_redo),
                 on_click=session.clear, width="stretch", help="Drop every edit of this session.")
    st.download_button("Save edits (.zip)", data=lambda: stack_archive(session), file_name="editscope-edits.zip",
                       mime="application/zip", key="sb_save", disabled=not edits, width="stretch",
                       on_click="ignore")
    upload = st.file_uploader("Load saved edits (.zip)", type=["zip"], key="sb_upload",
                              help="A zip saved with 'Save edits'; it replaces your current stack.")
    if upload is not None and st.button("Load these edits", key="sb_load", width="stretch"):
        try:
            loaded = load_stack_archive(session, upload.getvalue())
        except (UnsafeInput, EditError, ValueError, OSError) as err:
            show_error(err)
        else:
            state.sessions[ctx.model.key] = loaded
            state.notify(f"Loaded {len(loaded.edits)} edit(s) from {upload.name}.")
            st.rerun()


def render_sidebar(state: AppState) -> Context:
    """Draw the sidebar and return what it resolved (also stored as ``state.context``)."""
    with st.sidebar:
        ctx = _model_section(state)
        state.context = ctx
        _method_section(state, ctx)
        _stack_section(state, ctx)
    return ctx
