"""A trained checkpoint on this machine: load it, score it (HellaSwag, val loss), export it to transformers."""
