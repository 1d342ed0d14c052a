"""EditScope's editing core: models, edit requests, methods, reversible edits and sessions.

This package never imports streamlit, pandas or plotly.
"""

from editing.edit import Edit, EditError, InferenceWrapper, ModulePatch, ParamDelta, Route, WeightDelta, load_edit
from editing.models import ModelHandle, ModelNotFound, load_model
from editing.request import EditRequest, InvalidEditRequest
from editing.session import EditSession

__all__ = [
    "Edit", "EditError", "EditRequest", "EditSession", "InferenceWrapper", "InvalidEditRequest", "ModelHandle",
    "ModelNotFound", "ModulePatch", "ParamDelta", "Route", "WeightDelta", "load_edit", "load_model",
]
