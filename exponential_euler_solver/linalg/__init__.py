"""Linear algebra on block operators: the top-eigenpair solver and the chunked dense helpers it is built on.

:func:`top_eigenpairs` is the front end; :mod:`.lanczos` (cold start), :mod:`.lobpcg` (warm start) and
:mod:`.blocks` (accurate reductions without float64 copies) are its units. Nothing here knows about losses: an
operator is anything with ``shape``, ``dtype``, ``device`` and ``matmat``.
"""

from .eigen import EigenResult, default_tol, top_eigenpairs

__all__ = ["EigenResult", "top_eigenpairs", "default_tol"]
