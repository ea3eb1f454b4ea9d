"""Integrations with other libraries, one module each, each importing its library only there.

- :mod:`xentkit.integrations.transformers`: ``patch(model)`` makes a Hugging Face
  ``*ForCausalLM`` compute its training loss with :func:`xentkit.linear_cross_entropy`
  (install with ``pip install 'xentkit[transformers]'``).
"""
