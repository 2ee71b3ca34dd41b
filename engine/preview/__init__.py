"""Previews: a small picture of what the DiT predicts the clean latent to be, every few denoising steps.

A node's ``preview: {every: N}`` (or a request's ``preview_every``) asks for one every N steps. The worker opens a
:mod:`~engine.preview.sink` around each stage run; a family's denoising loop calls
:func:`engine.preview.picture.offer` once per step with a way to compute the prediction, which runs only at the
steps on the sink's cadence: the prediction is projected to RGB by the family's linear latent-to-RGB map
(:mod:`engine.preview.latent_spaces`, chosen in ``nodes/<family>/preview.py``), a strip of a few frames is
encoded as a JPEG of at most :data:`~engine.preview.picture.MAX_JPEG_BYTES`, and the sink sends it to the
controller as a signed ``preview`` message. Without a sink (previews off, a follower rank) nothing runs, and
with one the loop's tensors are only read: the frames are the same bit for bit either way.
"""
