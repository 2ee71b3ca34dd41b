"""Building blocks of the families' export recipes for diffusers modules (imports torch and diffusers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from engine.backends.recipe import Call, replace_method


class UnboundCall(torch.nn.Module):
    """``pick(type(owner).method(owner, *inputs, return_dict=False))``: the method called from the class, so that a
    replacement installed on the instance (``vae.decode = ...``) never calls itself."""

    def __init__(self, owner: torch.nn.Module, method: str, pick: Callable[[Any], torch.Tensor] = lambda out: out[0]):
        super().__init__()
        self.owner, self.method, self.pick = owner, method, pick

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.pick(getattr(type(self.owner), self.method)(self.owner, *inputs, return_dict=False))


def install_decode(vae: torch.nn.Module) -> Callable[[Call], Callable[[], None]]:
    """A recipe's ``install`` for a diffusers VAE's ``decode(z, return_dict)``: the backend's call answers it."""
    def install(call: Call) -> Callable[[], None]:
        def decode(z: torch.Tensor, return_dict: bool = True):
            (image,) = call(z)
            return DecoderOutput(sample=image) if return_dict else (image,)
        return replace_method(vae, "decode", decode)
    return install
