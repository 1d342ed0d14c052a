"""Looking inside a model: scoring and generation, causal tracing, second-moment statistics and
the embeddings of the scope map."""
