"""What of Wan's stages a graph backend runs (engine.backends): the VAE decode as a step graph.

AutoencoderKLWan decodes one latent frame at a time, each of its causal convolutions keeping the last frames it
saw in a cache (``feat_cache``) for the next. Exported, that cache becomes explicit inputs and outputs: a graph
for the first frame (no cache in; ``first_chunk``), one for the second (the first frame's one-frame caches in,
the upsamplers' "Rep" markers fixed in the graph) and one for every later frame (two-frame caches in and out).
The installed ``decode`` walks the frames through them and finishes as ``AutoencoderKLWan._decode`` does
(concatenate, unpatchify for the Wan2.2 VAE, clamp). Which cache entries hold tensors is found by running the
decoder on fake tensors (shapes only, no compute). The three graphs are static, one set per size: exported with
dynamic height and width (on the latents and every cache) they serve other sizes within tolerance too, but their
export took 4.4 times as long (79 s against 18 s for the three on the tiny model), more than a few sizes' static
builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.models.autoencoders.vae import DecoderOutput
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.backends.recipe import Call, ExportRecipe, TensorSig, replace_method
from engine.stages import Stage

RECIPE_VERSION = 1
REP = "Rep"  #: what diffusers' Wan upsamplers leave in their cache slot after the first frame


@dataclass(frozen=True)
class CacheLayout:
    tensors: tuple[int, ...]  #: cache slots holding a tensor
    reps: tuple[int, ...]  #: cache slots holding the "Rep" marker


class DecodeFrame(torch.nn.Module):
    """One latent frame [1, C, 1, h, w] and the cache slots of ``given`` to its frames and the cache after it."""

    def __init__(self, vae: torch.nn.Module, given: CacheLayout, first: bool):
        super().__init__()
        self.vae, self.given, self.first = vae, given, first
        self.slots = vae._cached_conv_counts["decoder"]
        self.returned = CacheLayout((), ())  #: set by :func:`_layouts` once the decoder has run on fake tensors

    def run(self, latents: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, list]:
        feat: list = [None] * self.slots
        for slot, tensor in zip(self.given.tensors, cache):
            feat[slot] = tensor
        for slot in self.given.reps:
            feat[slot] = REP
        kwargs = {"first_chunk": True} if self.first else {}
        frames = self.vae.decoder(self.vae.post_quant_conv(latents), feat_cache=feat, feat_idx=[0], **kwargs)
        return frames, feat

    def forward(self, latents: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames, feat = self.run(latents, *cache)
        return (frames, *(feat[slot] for slot in self.returned.tensors))


def _after(module: DecodeFrame, inputs: tuple[TensorSig, ...]) -> tuple[CacheLayout, tuple[TensorSig, ...]]:
    """The cache layout ``module`` returns and the shapes of its cache outputs, from a run on fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [torch.empty(sig.shape, dtype=getattr(torch, sig.dtype)) for sig in inputs]
        _, feat = module.run(*fakes)
    layout = CacheLayout(tuple(i for i, e in enumerate(feat) if torch.is_tensor(e)),
                         tuple(i for i, e in enumerate(feat) if isinstance(e, str) and e == REP))
    return layout, tuple(TensorSig(tuple(feat[i].shape), str(feat[i].dtype).removeprefix("torch."))
                         for i in layout.tensors)


def export_recipes(stage: Stage) -> tuple[ExportRecipe, ...]:
    if stage.spec.name != "vae_decode":
        return ()
    vae = stage.vae  # type: ignore[attr-defined] - Wan's VaeDecode holds its VAE
    scale = stage.geometry.s_scale  # type: ignore[attr-defined]
    dtype = str(vae.dtype).removeprefix("torch.")
    first = DecodeFrame(vae, CacheLayout((), ()), first=True)
    second = third = None

    @cache
    def shapes(height: int, width: int) -> tuple[tuple[TensorSig, ...], ...]:
        """Inputs of the three graphs for latents of ``height`` x ``width``; sets the layouts they return."""
        nonlocal second, third
        latents = TensorSig((1, vae.config.z_dim, 1, height, width), dtype)
        first.returned, first_cache = _after(first, (latents,))
        second = second or DecodeFrame(vae, first.returned, first=False)
        second.returned, second_cache = _after(second, (latents, *first_cache))
        third = third or DecodeFrame(vae, second.returned, first=False)
        third.returned, _ = _after(third, (latents, *second_cache))
        return (latents,), (latents, *first_cache), (latents, *second_cache)

    def for_request(index: int):
        return lambda request: shapes(request.height // scale, request.width // scale)[index]

    calls: dict[int, Call] = {}

    def decode(z: torch.Tensor, return_dict: bool = True):
        shapes(z.shape[3], z.shape[4])
        frames, state = [], ()
        for i in range(z.shape[2]):
            out, *state = calls[min(i, 2)](z[:, :, i:i + 1], *state)
            frames.append(out)
        video = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.config.patch_size)
        video = torch.clamp(video, min=-1.0, max=1.0)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def installer(index: int):
        def install(call: Call):
            calls[index] = call
            restore = replace_method(vae, "decode", decode) if len(calls) == 3 else (lambda: None)

            def undo() -> None:
                calls.pop(index, None)
                restore()
            return undo
        return install

    shapes(2, 2)  # the layouts (the same at every size), before any module is exported
    recipes = []
    for index, (name, module) in enumerate((("decode_first", first), ("decode_second", second), ("decode_next", third))):
        cache_names = tuple(f"cache_{slot}" for slot in module.given.tensors)  # type: ignore[union-attr]
        returned = tuple(f"cache_{slot}_out" for slot in module.returned.tensors)  # type: ignore[union-attr]
        recipes.append(ExportRecipe(name, RECIPE_VERSION, module, ("latents", *cache_names), ("frames", *returned),
                                    for_request(index), installer(index)))
    return tuple(recipes)
