"""The one typed state object each browser session keeps in ``st.session_state``.

Everything a person typed or computed lives here, so nothing is lost when a page reruns, when
they switch pages or when an action fails. Heavy shared objects (the model) are *not* stored
per session: they come from ``st.cache_resource`` (see :mod:`ui.models`); the session only keeps
its own :class:`~editing.core.session.EditSession`, whose edits touch the shared model only inside
``session.active()`` under the model's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import streamlit as st

from editing.core.session import EditSession

if TYPE_CHECKING:
    import pandas as pd

    from editing.core.request import EditRequest
    from editing.models.loader import ModelHandle
    from ui.jobs import ExperimentJob

STATE_KEY = "editscope"


@dataclass
class FactInputs:
    """The fact typed into an edit form; shared by the Playground, Compare and Locate pages.

    The true target starts empty: an empty one is read from the model before the edit, so no
    value ever stands in for a fact it does not belong to.
    """

    prompt: str = "Eiffel Tower is a famous landmark in"
    subject: str = "Eiffel Tower"
    target_new: str = "Italy"
    target_true: str = ""


#: The demo model's own phrasing: its fact base's templates (it knows no other wording).
DEMO_FACT = FactInputs()
#: A real model's: the probe ends where the answer starts ("... in the city of"), since short prompts such
#: as "... is located in" make a real LM go on with " the" first; SmolLM2 answers Paris here (P ≈ 0.7).
REAL_MODEL_FACT = FactInputs("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "")
DEFAULT_FACTS = (DEMO_FACT, REAL_MODEL_FACT)


def default_fact(spec: str) -> FactInputs:
    """The example fact the forms start with for the model ``spec``: one the model knows, in its phrasing."""
    return DEMO_FACT if spec.startswith("demo") else REAL_MODEL_FACT


@dataclass
class UserProbe:
    """A probe the person typed (prompt, expected answer, probe kind)."""

    prompt: str
    answer: str
    kind: str


@dataclass(frozen=True)
class ModelChoice:
    """Which model the sidebar asks for."""

    spec: str = "demo"
    device: str = "auto"
    dtype: str = "float32"

    @property
    def key(self) -> str:
        """Identifies the loaded model (one edit session per model and session)."""
        return f"{self.spec}|{self.device}|{self.dtype}"


@dataclass
class Context:
    """What the sidebar resolved in this run: the model, the method and its hyper-parameters."""

    model: ModelChoice
    handle: ModelHandle | None = None
    model_error: str | None = None
    method: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    hparam_error: str | None = None
    method_problem: str | None = None  # the method's readiness message (untrained, unsupported)

    @property
    def ready_to_edit(self) -> str | None:
        """None when an edit can run; else why not, in words."""
        if self.handle is None:
            return self.model_error or "No model is loaded; pick one in the sidebar."
        if self.method is None:
            return "No editing method is available."
        if self.method_problem:
            return self.method_problem
        if self.hparam_error:
            return f"Fix the hyper-parameters in the sidebar first: {self.hparam_error}"
        return None


@dataclass
class PlaygroundResult:
    """The last edit applied from the Playground, with everything needed to show and extend it."""

    request: EditRequest
    method: str
    probeset: Any  # eval.probes.ProbeSet
    outcome: Any  # eval.evaluate.EditOutcome
    model_key: str
    added: pd.DataFrame | None = None  # rows of probes typed after the edit was applied
    true_target: Any = None  # eval.outcomes.TrueTarget: which true target was used, and where it came from
    breakdown: Any = None  # ui.actions.TargetBreakdown: the targets token by token, before and after
    missing: dict[str, str] = field(default_factory=dict)  # probe kind -> why the fact has none
    carried_over: str | None = None  # a true target dropped because it belonged to another fact


@dataclass
class CompareResult:
    """One request through several methods."""

    request: EditRequest
    outcomes: dict[str, Any]  # method -> EditOutcome
    errors: dict[str, str]  # method -> message
    model_key: str
    on_stack: bool
    true_target: Any = None  # eval.outcomes.TrueTarget
    carried_over: str | None = None  # a true target dropped because it belonged to another fact


@dataclass
class TraceView:
    """Causal traces of one fact, one per kind (block, mlp, attn)."""

    prompt: str
    subject: str
    results: dict[str, Any]  # kind -> editing.analysis.trace.TraceResult
    model_key: str
    with_edits: bool = False


@dataclass
class LoadedDataset:
    """Edit cases read on the Batch page (also offered as examples in the Playground)."""

    label: str
    cases: list[Any]  # eval.datasets.EditCase


@dataclass
class AppState:
    """Per-session state of the dashboard."""

    fact: FactInputs = field(default_factory=FactInputs)
    #: (prompt, subject, true target) an example put in the forms; its true target belongs to that fact only
    fact_origin: tuple[str, str, str] | None = None
    #: widget values to set before the widgets are drawn on the next run (a widget cannot change once drawn)
    pending_widgets: dict[str, str] = field(default_factory=dict)
    user_probes: list[UserProbe] = field(default_factory=list)
    picked_case: Any = None  # eval.datasets.EditCase picked as the Playground's example (its probes are used)
    dataset: LoadedDataset | None = None
    sessions: dict[str, EditSession] = field(default_factory=dict)
    context: Context | None = None
    playground: PlaygroundResult | None = None
    compare: CompareResult | None = None
    job: ExperimentJob | None = None
    last_run_methods: tuple[str, ...] | None = None  # the methods of the last experiment started here
    viewed_run: int | None = None
    trace: TraceView | None = None
    scope_maps: dict[tuple, Any] = field(default_factory=dict)  # (edit, n probes, layer, position, method) -> ScopeMap
    notices: list[tuple[str, str]] = field(default_factory=list)  # (level, text) shown once after a rerun

    def session_for(self, handle: ModelHandle, model_key: str) -> EditSession:
        """This person's edit session on ``handle`` (one per model; created on first use).

        When the cached model was reloaded (another handle object under the same key), the edits
        move over to a session on the new handle; they hold tensors, not references to weights.
        """
        session = self.sessions.get(model_key)
        if session is None or session.handle is not handle:
            fresh = EditSession(handle)
            if session is not None:
                for edit in session.edits:
                    fresh.push(edit)
            self.sessions[model_key] = fresh
            session = fresh
        return session

    def current_session(self) -> EditSession | None:
        """The edit session of the model picked in the sidebar (None when no model is loaded)."""
        ctx = self.context
        if ctx is None or ctx.handle is None:
            return None
        return self.session_for(ctx.handle, ctx.model.key)

    def notify(self, text: str, level: str = "success") -> None:
        """Queue a message to show at the top of the next run (survives ``st.rerun``)."""
        self.notices.append((level, text))


def get_state() -> AppState:
    """The session's :class:`AppState`, created on first access."""
    if STATE_KEY not in st.session_state:
        st.session_state[STATE_KEY] = AppState()
    return st.session_state[STATE_KEY]
