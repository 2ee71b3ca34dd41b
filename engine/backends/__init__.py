"""Stage backends: a node's stage run by the first backend of its chain that works (``backend:`` in the graph).

``chain`` wraps a built stage (``with_backends``, called where the worker builds its stages) and reports what ran
(``stage_uses``); ``graph`` runs a family's export recipes (``recipe``) on a graph backend (``runners``) with
artifacts from the ``cache`` checked by the ``parity`` gate and kept ``resident`` (one per size, or one over the
range of sizes ``sizes`` gives a recipe with dynamic axes); ``compiled`` is torch.compile, gated the same way;
``build`` is ``engine build``. Families describe what to export in ``nodes/<family>/exports.py``.
"""
