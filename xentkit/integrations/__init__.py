"""Integrations with other libraries, one module each, each importing its library only there.

- :mod:`xentkit.integrations.transformers`: ``patch(model)`` makes a Hugging Face
  ``*ForCausalLM`` compute its training loss with :func:`xentkit.linear_cross_entropy`
  (install with ``pip install 'xentkit[transformers]'``).
- :mod:`xentkit.integrations.trl`: ``patch()`` makes TRL's fused LM head (per-token
  log-probabilities, entropy and the other fields its trainers read) and its distillation
  kernel run on xentkit's kernels.
"""
