"""Backend chains in the graph file: validated with file and line, carried by the plan into each worker's spec,
and counted by /metrics when a stage falls back."""

from __future__ import annotations

import pytest

from engine.controller.tracker import TrackedRequest
from engine.errors import SpecError
from engine.plan.check import check_graph
from engine.serve.metrics import ServiceMetrics
from engine.spec.load import load_graph
from engine.stages import RequestParams
from tests.integration.engine_run import GRAPHS


def problems(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        check_graph(load_graph(GRAPHS / "qwen_image_t2i.yaml", list(overrides)))
    return [str(p) for p in caught.value.problems]


def test_a_valid_chain_reaches_the_plan():
    checked = check_graph(load_graph(GRAPHS / "qwen_image_t2i.yaml",
                                     ["nodes.decoder.backend.vae_decode=[tensorrt,onnxruntime,eager]",
                                      "nodes.transformer.backend.denoise=[compile,eager]", "nodes.decoder.strict=true"]))
    assert checked.loaded.spec.nodes["decoder"].backend == {"vae_decode": ["tensorrt", "onnxruntime", "eager"]}


def test_an_unknown_backend_is_named_with_its_line():
    (problem,) = problems("nodes.decoder.backend.vae_decode=[onnxrt]")
    assert "nodes.decoder.backend.vae_decode[0]: got 'onnxrt'" in problem and "'onnxruntime'" in problem


@pytest.mark.parametrize("override, message", [
    ("nodes.decoder.backend.denoise=[compile]", "node 'decoder' does not run stage 'denoise'"),
    ("nodes.transformer.backend.denoise=[onnxruntime]", "onnxruntime cannot serve 'denoise': qwen_image exports no graph of it"),
    ("nodes.encoder.backend.text_encode=[openvino,eager]", "openvino cannot serve 'text_encode'"),
    ("nodes.decoder.backend.vae_decode=[eager,onnxruntime]", "onnxruntime after it would never run; put eager last"),
    ("nodes.decoder.backend.vae_decode=[openvino,openvino]", "openvino is listed twice"),
])
def test_a_chain_the_node_cannot_run_is_refused(override, message):
    (problem,) = problems(override)
    assert message in problem and problem.startswith(f"{GRAPHS / 'qwen_image_t2i.yaml'}") and "nodes." in problem


def test_fallbacks_are_counted_by_node_stage_and_reason():
    metrics = ServiceMetrics(service=None)  # type: ignore[arg-type] - the live gauges are not read here
    request = TrackedRequest(id="r1", params=RequestParams(), clock_zero=0.0)
    request.backends["vae_decode"] = {"node": "decoder", "chain": [
        {"backend": "tensorrt", "reason": "import_error", "detail": ""},
        {"backend": "onnxruntime", "reason": "run_error", "detail": ""},
        {"backend": "eager", "reason": None, "detail": ""}]}
    metrics.finished(request)
    samples = {tuple(sorted(s.labels.items())): s.value for family in metrics.backend_fallbacks.collect()
               for s in family.samples if s.name == "engine_backend_fallback_total"}
    assert samples == {
        (("from", "tensorrt"), ("node", "decoder"), ("reason", "import_error"), ("stage", "vae_decode"), ("to", "onnxruntime")): 1.0,
        (("from", "onnxruntime"), ("node", "decoder"), ("reason", "run_error"), ("stage", "vae_decode"), ("to", "eager")): 1.0}


def test_each_worker_is_told_its_chains(tmp_path):
    from engine.plan.build import plan_on_this_host
    from engine.worker.contract import worker_specs

    checked = check_graph(load_graph(GRAPHS / "qwen_image_t2i.yaml", ["nodes.decoder.backend.vae_decode=[openvino,eager]",
                                                                      "nodes.decoder.strict=true"]))
    plan, source = plan_on_this_host(checked)
    specs = {spec.node: spec for spec in worker_specs(plan, run_id="r", source=source, broker=lambda node, replica: {},
                                                      out_dir=tmp_path, save_frames=False, heartbeat_s=1.0)}
    assert specs["decoder"].backends == {"vae_decode": ("openvino", "eager")} and specs["decoder"].strict_backends
    assert specs["decoder"].limits == plan.limits == {"height": 64, "width": 96}  # what its dynamic artifacts serve
    assert specs["transformer"].backends == {} and not specs["transformer"].strict_backends


def test_engine_plan_lists_each_chain_and_the_shapes_built(tmp_path):
    from engine.backends.build import chains
    from engine.backends.cache import ArtifactCache, Key, Manifest, Parity, slot_for
    from engine.backends.recipe import TensorSig
    from engine.plan.build import plan_on_this_host

    checked = check_graph(load_graph(GRAPHS / "qwen_image_t2i.yaml",
                                     ["nodes.decoder.backend.vae_decode=[tensorrt,onnxruntime,eager]"]))
    plan, source = plan_on_this_host(checked)
    cache = ArtifactCache(tmp_path)
    slot = slot_for(str(source), "vae_decode", "decode", (TensorSig((1, 16, 1, 8, 12), "float32"),), "float32",
                    "onnxruntime", "cpu")
    key = Key(slot=slot, weights="w", recipe_version=1, backend_version="1", exporter="e", fingerprint="f")
    cache.commit(cache.staging(slot), Manifest(key=key, files=(), build_s=1.0, parity=Parity(
        passed=True, max_abs=0.0, cosine=1.0, psnr_db=999.0, threshold="max abs <= 0.0003")))
    assert list(chains(plan, source, cache)) == [["decoder", "vae_decode", "tensorrt -> onnxruntime -> eager",
                                                  "tensorrt: nothing built; onnxruntime: 1x16x1x8x12"]]
