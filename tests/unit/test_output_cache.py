"""Stage outputs kept for repeated inputs (engine.worker.output_cache): bounded by bytes, least recently used out,
keyed by the fields a stage declares (and an input file's bytes), and never changing an output: the frames of a
request whose text encoding was a cache hit equal those of a miss, on the tiny Wan model."""

from __future__ import annotations

import pytest
import torch

from engine.stages import StageSpec
from engine.worker.output_cache import CachedStage, Entry, OutputCache, with_output_cache
from nodes.wan import family
from nodes.wan.family import WanImageRequest, WanRequest
from tests.unit.wan_support import configs, load_node, one_thread, tiny  # noqa: F401 - one_thread: a fixture


def entry(nbytes: int) -> Entry:
    return Entry({"x": torch.zeros(nbytes, dtype=torch.uint8)}, nbytes, 1.0)


def test_the_cache_holds_at_most_its_bytes_the_least_recently_used_going_first():
    cache = OutputCache(capacity=100)
    cache.put("a", entry(40))
    cache.put("b", entry(40))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", entry(40))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 80 and len(cache) == 2
    cache.put("huge", entry(101))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 2


class Counting:
    """A stage that counts its runs and returns a tensor made from its request."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.runs = 0

    def run(self, request, inputs, progress):
        self.runs += 1
        return {"embeds": torch.full((4,), float(len(request.prompt)))}


def test_a_hit_skips_the_stage_and_returns_copies_a_changed_field_misses():
    spec = next(s for s in family.stages("t2v") if s.name == "text_encode")
    inner = Counting(spec)
    stage = with_output_cache(inner, OutputCache(1 << 20), "weights")
    assert isinstance(stage, CachedStage)
    first = stage.run(WanRequest(prompt="a fox", seed=1), {}, lambda *_: None)
    first["embeds"].add_(100)  # a caller changing its outputs does not change what the cache keeps
    again = stage.run(WanRequest(prompt="a fox", seed=2), {}, lambda *_: None)  # the seed is not part of the key
    assert inner.runs == 1 and stage.last.hit and torch.equal(again["embeds"], torch.full((4,), 5.0))
    stage.run(WanRequest(prompt="a fox", negative_prompt="dark", seed=1), {}, lambda *_: None)
    assert inner.runs == 2 and not stage.last.hit


def test_an_image_is_keyed_by_its_bytes_not_its_path(tmp_path):
    spec = next(s for s in family.stages("i2v") if s.name == "image_encode")
    inner = Counting(spec)
    stage = with_output_cache(inner, OutputCache(1 << 20), "weights")
    image = tmp_path / "frame.png"
    image.write_bytes(b"one")
    request = WanImageRequest.model_construct(prompt="x", image=image)
    stage.run(request, {}, lambda *_: None)
    stage.run(request, {}, lambda *_: None)
    image.write_bytes(b"two")
    stage.run(request, {}, lambda *_: None)
    assert inner.runs == 2


def test_stages_without_a_cache_key_or_without_a_cache_run_as_they_are():
    denoise = Counting(next(s for s in family.stages("t2v") if s.name == "denoise"))
    assert with_output_cache(denoise, OutputCache(1 << 20), "w") is denoise
    text = Counting(next(s for s in family.stages("t2v") if s.name == "text_encode"))
    assert with_output_cache(text, None, "w") is text and with_output_cache(text, OutputCache(0), "w") is text


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "nocfg"])
def test_frames_of_a_cache_hit_equal_those_of_a_miss(guidance):
    source, model_configs = tiny("t2v"), configs(tiny("t2v"))
    components = load_node("t2v", ("text_encode", "denoise", "vae_decode"), "float32")
    stages = {spec.name: family.build_stage("t2v", spec.name, components, "cpu", "float32", model_configs)
              for spec in family.stages("t2v")}
    stages["text_encode"] = with_output_cache(stages["text_encode"], OutputCache(64 << 20), str(source))
    request = WanRequest(prompt="a red fox in snow", negative_prompt="blurry", height=32, width=32, num_frames=5, steps=2,
                         guidance_scale=guidance, seed=3)

    def frames() -> torch.Tensor:
        tensors: dict[str, torch.Tensor] = {}
        for spec in family.stages("t2v"):
            tensors.update(stages[spec.name].run(request, tensors, lambda *_: None))
        return tensors["frames"]

    miss = frames()
    assert not stages["text_encode"].last.hit
    hit = frames()
    assert stages["text_encode"].last.hit and stages["text_encode"].last.saved_s > 0
    assert torch.equal(hit, miss)


def test_every_declared_cache_key_names_fields_of_the_tasks_request():
    from engine.families import get_family

    declared = 0
    for name in ("wan", "qwen_image", "z_image"):
        fam = get_family(name)
        for task in fam.tasks:
            fields = fam.request_type(task).model_fields
            for spec in fam.stages(task):
                if spec.cache_key is not None:
                    declared += 1
                    assert set(spec.cache_key) <= set(fields), (name, task, spec.name)
                    assert not spec.inputs, f"{name} {task} {spec.name} reads tensors: its outputs are not its fields'"
    assert declared >= 5
