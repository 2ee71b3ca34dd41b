"""Ulysses sequence parallel in diffusers' WanTransformer3DModel, at the points diffusers' own ``_cp_plan`` names.

Forward hooks cut the token sequence where it enters the blocks (and the rotary embeddings and, with
``expand_timesteps``, the per-token timesteps with it) and join it where it leaves ``proj_out``. Self-attention goes
through :meth:`engine.parallel.Split.attend`: the Wan attention processor hands its ``parallel_config`` to
``dispatch_attention_fn`` for self-attention only (cross-attention reads the whole text on every rank), so the
processors of a split transformer carry the Split there and this module's dispatch runs Ulysses around the
library's attention when it finds one.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers import transformer_wan

from engine.parallel import Split

_library_dispatch = transformer_wan.dispatch_attention_fn


def _dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, parallel_config: Any = None,
              **kwargs: Any) -> torch.Tensor:
    if isinstance(parallel_config, Split):
        return parallel_config.attend(_library_dispatch, query, key, value, *args, **kwargs)
    return _library_dispatch(query, key, value, *args, parallel_config=parallel_config, **kwargs)


def split_sequence(transformer: torch.nn.Module, split: Split) -> None:
    """Make ``transformer`` compute this rank's token shard; outputs stay whole on every rank."""
    transformer_wan.dispatch_attention_fn = _dispatch

    def shard_timestep(module, args, kwargs):  # noqa: ANN001 - hook signature
        timestep = kwargs.get("timestep")
        if timestep is not None and timestep.ndim == 2:  # expand_timesteps: one timestep per token
            kwargs["timestep"] = split.shard(timestep, 1)
        return args, kwargs

    transformer.register_forward_pre_hook(shard_timestep, with_kwargs=True)
    transformer.rope.register_forward_hook(lambda module, args, out: tuple(split.shard(f, 1) for f in out))
    transformer.blocks[0].register_forward_pre_hook(lambda module, args: (split.shard(args[0], 1), *args[1:]))
    transformer.proj_out.register_forward_hook(lambda module, args, out: split.gather(out, 1))
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = split
