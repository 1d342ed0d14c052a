"""The edit model: edit requests, reversible edits (weight deltas, module patches, inference
wrappers), sessions, forward hooks, the model lock, safety checks and cost measurement."""
