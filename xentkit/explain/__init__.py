"""Why a loss is the number it is: a term-by-term breakdown, the batch in numbers, and the
mistakes it can see.

:func:`explain` computes a loss the way the library does and shows every step. The xentkit
function is called once for the final value (so the input is validated exactly as it is
there); every intermediate quantity comes from :mod:`xentkit.reference`'s ``*_terms``
functions, laid out as rows by :mod:`xentkit._layout`.

- :mod:`~xentkit.explain.terms`: the breakdown of each loss, per position, and the statistics;
- :mod:`~xentkit.explain.findings`: the mistakes, one detector function each, in one registry;
- :mod:`~xentkit.explain.explanation`: what :func:`explain` returns (``Explanation``,
  ``Finding``, ``Stats``);
- renderers: :mod:`~xentkit.explain.render_text`, :mod:`~xentkit.explain.render_markdown`,
  :mod:`~xentkit.explain.render_html`, :mod:`~xentkit.explain.render_rich`,
  :mod:`~xentkit.explain.plot`.
"""

from xentkit.explain.api import explain
from xentkit.explain.explanation import Explanation, Finding, Stats
from xentkit.explain.findings import DETECTORS
from xentkit.explain.options import LOSSES, OPTIONS

__all__ = ["DETECTORS", "LOSSES", "OPTIONS", "Explanation", "Finding", "Stats", "explain"]
