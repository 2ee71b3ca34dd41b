"""One stage split across the ranks of a several-device replica: the part a model family sees.

A node with ``place.devices`` and ``parallel: {cfg: C, ulysses: U}`` runs each replica as C x U worker processes,
one per device (:mod:`engine.worker.group` starts them). Rank ``r`` computes guidance branch ``r // U`` and token
shard ``r % U``:

- CFG parallel: the conditional and unconditional predictions of a step run on two ranks at once; each rank then
  has both (an all-gather), and every rank combines and steps the scheduler identically. Exact: the same
  computation, on other processes.
- Ulysses sequence parallel: each rank holds 1/U of the DiT's tokens through the blocks; around self-attention an
  all-to-all trades that for all tokens of 1/U of the heads, and back; the tokens are gathered after the last
  layer. Exact on CPU: attention heads and token rows are computed independently.

A splittable stage holds a :class:`Split` (``SINGLE`` on one device) and asks it for the branches and for the
attention; families hook it into their transformer (``nodes/<family>/parallel.py``). Collectives use
``torch.distributed`` groups that the worker's rank group made; this module imports torch only when it runs one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


@dataclass(frozen=True)
class Split:
    """This rank's share of a split stage: its guidance branch and token shard, and the groups it shares them in."""

    cfg: int = 1
    cfg_rank: int = 0
    ulysses: int = 1
    ulysses_rank: int = 0
    cfg_group: Any = None  #: torch.distributed group of the ranks with this rank's token shard
    ulysses_group: Any = None  #: torch.distributed group of the ranks with this rank's guidance branch

    # -- guidance branches ------------------------------------------------------------------------------------

    def predict(self, branches: Sequence[Callable[[], "torch.Tensor"]]) -> list["torch.Tensor"]:
        """Every branch's prediction, in order. With ``cfg: 2`` and two branches this rank runs only its own and
        receives the other; with one branch (no guidance) every rank runs it."""
        if self.cfg == 1 or len(branches) == 1:
            return [branch() for branch in branches]
        if len(branches) != self.cfg:
            raise ValueError(f"{len(branches)} guidance branches on {self.cfg} CFG ranks")
        import torch.distributed as dist

        mine = branches[self.cfg_rank]().contiguous()
        gathered = [mine if i == self.cfg_rank else mine.new_empty(mine.shape) for i in range(self.cfg)]
        dist.all_gather(gathered, mine, group=self.cfg_group)
        return gathered

    # -- token shards -----------------------------------------------------------------------------------------

    def shard(self, tensor: "torch.Tensor", dim: int) -> "torch.Tensor":
        """This rank's slice of ``tensor``'s tokens along ``dim`` (the validator made them divide evenly)."""
        if self.ulysses == 1:
            return tensor
        if tensor.shape[dim] % self.ulysses:
            from engine.errors import RequestError

            raise RequestError(f"{tensor.shape[dim]} DiT tokens do not split over ulysses {self.ulysses}: choose a size "
                               f"whose token count divides by {self.ulysses}")
        return tensor.chunk(self.ulysses, dim=dim)[self.ulysses_rank].contiguous()

    def gather(self, tensor: "torch.Tensor", dim: int) -> "torch.Tensor":
        """Every rank's token slice, joined along ``dim``: the inverse of :meth:`shard`."""
        if self.ulysses == 1:
            return tensor
        import torch
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [tensor if i == self.ulysses_rank else torch.empty_like(tensor) for i in range(self.ulysses)]
        dist.all_gather(parts, tensor, group=self.ulysses_group)
        return torch.cat(parts, dim=dim)

    def sum_over_tokens(self, sums: "torch.Tensor") -> "torch.Tensor":
        """Sums over this rank's tokens -> the same sums over all tokens, on every rank of the branch (so that a
        decision taken from them, a step cache's, is one decision for the whole sequence)."""
        if self.ulysses == 1:
            return sums
        import torch.distributed as dist

        sums = sums.clone()
        dist.all_reduce(sums, group=self.ulysses_group)
        return sums

    def attend(self, attention: Callable[..., "torch.Tensor"], query: "torch.Tensor", key: "torch.Tensor",
               value: "torch.Tensor", **kwargs: Any) -> "torch.Tensor":
        """Ulysses around ``attention``: [B, S/U, H, D] token shards in, all tokens of H/U heads attended, the
        shard's tokens of every head out. ``attention`` takes and returns [B, S, H', D]."""
        if self.ulysses == 1:
            return attention(query, key, value, **kwargs)
        heads = query.shape[2]
        if heads % self.ulysses:
            raise ValueError(f"{heads} attention heads do not split over {self.ulysses} Ulysses ranks")
        out = attention(*(self._heads_from_tokens(t) for t in (query, key, value)), **kwargs)
        return self._tokens_from_heads(out)

    def _heads_from_tokens(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """[B, S/U, H, D] on each rank -> [B, S, H/U, D]: head group i goes to rank i, token shards come back in
        rank order."""
        import torch
        import torch.distributed as dist

        b, s, h, d = tensor.shape
        send = tensor.reshape(b, s, self.ulysses, h // self.ulysses, d).permute(2, 1, 0, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.ulysses_group)
        return received.reshape(self.ulysses * s, b, h // self.ulysses, d).permute(1, 0, 2, 3).contiguous()

    def _tokens_from_heads(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """[B, S, H/U, D] -> [B, S/U, H, D]: the inverse of :meth:`_heads_from_tokens`."""
        import torch
        import torch.distributed as dist

        b, s, h, d = tensor.shape
        send = tensor.reshape(b, self.ulysses, s // self.ulysses, h, d).permute(1, 2, 0, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.ulysses_group)
        return received.permute(2, 1, 0, 3, 4).reshape(b, s // self.ulysses, self.ulysses * h, d).contiguous()


#: A stage on one device.
SINGLE = Split()


def rank_layout(cfg: int, ulysses: int) -> tuple[list[list[int]], list[list[int]]]:
    """The ranks of each CFG group (same token shard) and of each Ulysses group (same branch)."""
    cfg_groups = [[branch * ulysses + shard for branch in range(cfg)] for shard in range(ulysses)]
    ulysses_groups = [[branch * ulysses + shard for shard in range(ulysses)] for branch in range(cfg)]
    return cfg_groups, ulysses_groups
