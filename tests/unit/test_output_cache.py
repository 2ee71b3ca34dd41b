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

    def parts(self, request):
        return ()  # cached whole (a backend chain's wrapper does not run parts)


def test_a_hit_skips_the_stage_and_returns_copies_a_changed_field_misses():
    spec = next(s for s in family.stages("t2v") if s.name == "text_encode")
    inner = Counting(spec)
    stage = with_output_cache(inner, OutputCache(1 << 20), "weights")
    assert isinstance(stage, CachedStage)
    first = stage.run(WanRequest(prompt="a fox", seed=1), {}, lambda *_: None)
    first["embeds"].add_(100)  # a caller changing its outputs does not change what the cache keeps
    again = stage.run(WanRequest(prompt="a fox", seed=2), {}, lambda *_: None)  # the seed is not part of the key
    assert inner.runs == 1 and stage.last["text_encode"].hit and torch.equal(again["embeds"], torch.full((4,), 5.0))
    stage.run(WanRequest(prompt="a fox", negative_prompt="dark", seed=1), {}, lambda *_: None)
    assert inner.runs == 2 and not stage.last["text_encode"].hit


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
    parts = ["text_encode/prompt", "text_encode/negative_prompt"][:2 if guidance > 1 else 1]
    assert list(stages["text_encode"].last) == parts and not any(o.hit for o in stages["text_encode"].last.values())
    hit = frames()
    assert all(o.hit and o.saved_s > 0 for o in stages["text_encode"].last.values())
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
                for part in spec.cache_parts:  # a part's fields are the request's, its outputs the stage's
                    assert set(part.fields) <= set(spec.cache_key or ()), (name, task, spec.name, part.name)
                if spec.cache_parts:  # the parts together make every output, each once
                    made = [output for part in spec.cache_parts for output in part.outputs]
                    assert sorted(made) == sorted(t.name for t in spec.outputs), (name, task, spec.name)
    assert declared >= 5


class Parted(Counting):
    """A stage cached part by part, counting each part's runs."""

    def __init__(self, spec: StageSpec):
        super().__init__(spec)
        self.part_runs: list[tuple[str, str]] = []

    def parts(self, request):
        return ("prompt", "negative_prompt") if request.guidance_scale > 1 else ("prompt",)

    def run_part(self, part, request):
        text = getattr(request, part)
        self.part_runs.append((part, text))
        return {f"{part}_embeds": torch.full((4,), float(len(text)))}


def test_a_new_prompt_with_the_usual_negative_prompt_reuses_the_negative_embedding():
    inner = Parted(next(s for s in family.stages("t2v") if s.name == "text_encode"))
    stage = with_output_cache(inner, OutputCache(1 << 20), "weights")
    usual = "blurry, low quality"
    first = stage.run(WanRequest(prompt="a fox", negative_prompt=usual), {}, lambda *_: None)
    assert set(first) == {"prompt_embeds", "negative_prompt_embeds"}
    second = stage.run(WanRequest(prompt="a whale", negative_prompt=usual), {}, lambda *_: None)
    assert inner.part_runs == [("prompt", "a fox"), ("negative_prompt", usual), ("prompt", "a whale")]
    assert {part: outcome.hit for part, outcome in stage.last.items()} == {
        "text_encode/prompt": False, "text_encode/negative_prompt": True}
    assert torch.equal(second["negative_prompt_embeds"], first["negative_prompt_embeds"])
    stage.run(WanRequest(prompt="a fox", negative_prompt="dark", guidance_scale=1.0), {}, lambda *_: None)
    assert stage.last == {"text_encode/prompt": stage.last["text_encode/prompt"]} and stage.last["text_encode/prompt"].hit
    assert inner.runs == 0  # never run whole


def test_the_prompts_encoded_one_by_one_equal_the_pipelines_joint_call():
    """WanPipeline.encode_prompt encodes prompt and negative prompt in one call (two inside): each part alone gives
    the same bits, so a part from the cache is what the joint call would have given."""
    components = load_node("t2v", ("text_encode",), "float32")
    stage = family.build_stage("t2v", "text_encode", components, "cpu", "float32", configs(tiny("t2v")))
    request = WanRequest(prompt="a red fox in snow", negative_prompt="blurry, still", guidance_scale=5.0)
    with torch.no_grad():  # as the stage ran it whole, before it ran parts
        joint = stage.pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                         do_classifier_free_guidance=True, max_sequence_length=512, device="cpu")
        none = stage.pipe.encode_prompt(prompt="x", negative_prompt=None, do_classifier_free_guidance=True,
                                        max_sequence_length=512, device="cpu")[1]
    assert torch.equal(stage.run_part("prompt", request)["prompt_embeds"], joint[0])
    assert torch.equal(stage.run_part("negative_prompt", request)["negative_prompt_embeds"], joint[1])
    empty = WanRequest(prompt="x", negative_prompt="", guidance_scale=5.0)  # "" as the pipeline's default None
    assert torch.equal(stage.run_part("negative_prompt", empty)["negative_prompt_embeds"], none)


def test_frames_of_a_request_whose_negative_prompt_alone_hit_equal_those_uncached():
    model_configs = configs(tiny("t2v"))
    components = load_node("t2v", ("text_encode", "denoise", "vae_decode"), "float32")
    plain = {spec.name: family.build_stage("t2v", spec.name, components, "cpu", "float32", model_configs)
             for spec in family.stages("t2v")}
    cached = {**plain, "text_encode": with_output_cache(plain["text_encode"], OutputCache(64 << 20), "tiny")}

    def frames(stages, prompt: str) -> torch.Tensor:
        request = WanRequest(prompt=prompt, negative_prompt="blurry", height=32, width=32, num_frames=5, steps=2, seed=3)
        tensors: dict[str, torch.Tensor] = {}
        for spec in family.stages("t2v"):
            tensors.update(stages[spec.name].run(request, tensors, lambda *_: None))
        return tensors["frames"]

    frames(cached, "a red fox in snow")
    hit = frames(cached, "a paper boat")
    assert {p: o.hit for p, o in cached["text_encode"].last.items()} == {"text_encode/prompt": False,
                                                                         "text_encode/negative_prompt": True}
    assert torch.equal(hit, frames(plain, "a paper boat"))
