"""Request preparation: untrusted request bytes -> model inputs (text tokens, audio features, image tensors)."""
