"""Step caching: fewer DiT passes by reusing the previous pass's residual while the DiT's input barely changes.

A denoising loop calls its transformer once per step and guidance branch (``cond``, ``uncond``, or both batched).
Through a :class:`~engine.stepcache.cache.StepCache`, made fresh for each request and stage run, each call runs the
transformer as it is, but with the transformer's block stack routed through the cache
(:mod:`engine.stepcache.blocks`): on a skipped pass the blocks hand their input through and the last one adds the
residual the blocks added on the branch's last computed pass; embeddings, the output head and unpatchifying run as
always. Which passes skip is a method's rule (:mod:`engine.stepcache.rules`) over a measure of change:

- ``teacache``: the relative L1 change of the first block's modulated input, rescaled by a model's published
  polynomial where one exists, accumulated until it reaches the threshold (TeaCache, Liu et al. 2024);
- ``magcache``: the accumulated drift of the residual's magnitude ratio between steps (MagCache, Ma et al. 2025);
- ``fbcache``: the relative L1 change of the first block's residual, the first block always running (first-block
  cache, ParaAttention).

State (previous indicator, residual, accumulators) is per branch of one run, never per node: two requests on one
node, and the two Wan2.2 experts of one request, never see each other's. ``threshold: 0`` never skips and computes
exactly what the transformer computes; ``none`` calls the transformer without the cache in the way.

This package holds the family-agnostic part; what a model's block takes and returns, and what its modulated
input is, comes from the family (``nodes/<family>/stepcache.py``, a :class:`~engine.stepcache.blocks.BlockStack`).
"""
