"""Fast paths, one module per backend; :mod:`xentkit.functional` imports them on first use."""
