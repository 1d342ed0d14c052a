"""EditScope's editing core: models, edit requests, methods, reversible edits and sessions.

This package never imports streamlit, pandas or plotly.
"""

from editing.core.edit import Edit, EditError, InferenceWrapper, ModulePatch, ParamDelta, Route, WeightDelta, load_edit
from editing.core.request import EditRequest, InvalidEditRequest
from editing.core.session import EditSession
from editing.models.loader import ModelHandle, ModelNotFound, load_model

__all__ = [
    "Edit", "EditError", "EditRequest", "EditSession", "InferenceWrapper", "InvalidEditRequest", "ModelHandle",
    "ModelNotFound", "ModulePatch", "ParamDelta", "Route", "WeightDelta", "load_edit", "load_model",
]
