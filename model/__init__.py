"""What runs on the GPU node: the GPT-2 model, trainer, data loader, checkpoints and sampling.

Imports only torch, numpy, tiktoken and the standard library (plus the storage layer), so a
node installs little and starts fast.
"""
