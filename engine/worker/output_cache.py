"""Stage outputs kept for requests that repeat their inputs: a stage wrapper over a bounded LRU cache.

A stage whose outputs depend only on the weights and on some request fields (a text encoder on the prompt and the
negative prompt; an image encoder on the image's bytes) declares those fields as data (``StageSpec.cache_key``).
The worker wraps such a stage in a :class:`CachedStage`: the key is a digest of the weights' identity (model
source, components, dtype, device), the stage's name and the values of those fields, with the bytes of a file a
field names (``StageSpec.reads``) in place of its path. A hit returns copies of the outputs kept from the miss,
without running the stage; the cache holds at most ``capacity`` bytes of tensors, the least recently used going
first. A cache never changes an output: a hit returns exactly what the stage returned for those inputs.

A stage that declares parts (``StageSpec.cache_parts``: Wan's text encoder encodes the prompt and the negative prompt
in separate calls) is cached part by part, each under a key of its fields alone: a new prompt with the usual
negative prompt runs the prompt's part and takes the negative prompt's from the cache. Each part's hit or miss is
counted under ``stage/part`` (``text_encode/negative_prompt``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.stages import ProgressFn, RequestParams, Stage

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


@dataclass(frozen=True)
class Entry:
    outputs: dict[str, "torch.Tensor"]
    nbytes: int
    seconds: float  #: what running the stage took: what each hit saves


@dataclass(frozen=True)
class Outcome:
    hit: bool
    saved_s: float  #: seconds the stage took when it ran (0 on a miss)


class OutputCache:
    """Entries by key, at most ``capacity`` bytes of tensors, least recently used out first (thread-safe)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.nbytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: Entry) -> None:
        """Keep ``entry`` unless it alone is larger than the whole cache; older entries make room."""
        if entry.nbytes > self.capacity:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self.nbytes -= old.nbytes if old is not None else 0
            while self._entries and self.nbytes + entry.nbytes > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
            self._entries[key] = entry
            self.nbytes += entry.nbytes


class CachedStage(Stage):
    """``stage`` behind ``cache``; :attr:`last` says how its latest run's outputs came: per part (``stage/part``),
    or for the whole stage (its name), a hit or a miss."""

    def __init__(self, stage: Stage, cache: OutputCache, identity: str):
        self.stage = stage
        self.spec = stage.spec
        self.cache = cache
        self.identity = identity
        self.last: dict[str, Outcome] = {}

    def key(self, request: RequestParams, part: str = "") -> str:
        """Digest of the weights' identity, the stage (and part) and the request fields its outputs depend on."""
        names = next(p.fields for p in self.spec.cache_parts if p.name == part) if part else self.spec.cache_key or ()
        digest = hashlib.blake2b(digest_size=20)
        fields: dict[str, Any] = {}
        for name in names:
            value = getattr(request, name)
            if name in self.spec.reads and value is not None:
                value = hashlib.blake2b(Path(value).read_bytes(), digest_size=20).hexdigest()
            fields[name] = value
        digest.update(json.dumps([self.identity, self.spec.name, part, fields], sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def run(self, request: RequestParams, inputs: Mapping[str, "torch.Tensor"], progress: ProgressFn) -> dict[str, "torch.Tensor"]:
        parts = self.stage.parts(request) if self.spec.cache_parts else ()
        if not parts:
            outputs, outcome = self._cached(self.key(request), lambda: self.stage.run(request, inputs, progress))
            self.last = {self.spec.name: outcome}
            return outputs
        outputs, self.last = {}, {}
        for part in parts:
            made, self.last[f"{self.spec.name}/{part}"] = self._cached(
                self.key(request, part), lambda part=part: self.stage.run_part(part, request))
            outputs.update(made)
        return outputs

    def _cached(self, key: str, compute: Callable[[], dict[str, "torch.Tensor"]]) -> tuple[dict[str, "torch.Tensor"], Outcome]:
        """Copies of the outputs kept under ``key``, else ``compute()``'s, then kept."""
        entry = self.cache.get(key)
        if entry is not None:
            return {name: tensor.clone() for name, tensor in entry.outputs.items()}, Outcome(hit=True, saved_s=entry.seconds)
        started = time.perf_counter()
        outputs = compute()
        seconds = time.perf_counter() - started
        kept = {name: tensor.detach().clone() for name, tensor in outputs.items()}
        self.cache.put(key, Entry(kept, sum(t.numel() * t.element_size() for t in kept.values()), seconds))
        return outputs, Outcome(hit=False, saved_s=0.0)


def with_output_cache(stage: Stage, cache: OutputCache | None, identity: str) -> Stage:
    """``stage`` behind ``cache`` if its spec declares a cache key and there is a cache; else ``stage`` itself."""
    if cache is None or cache.capacity <= 0 or stage.spec.cache_key is None:
        return stage
    return CachedStage(stage, cache, identity)
