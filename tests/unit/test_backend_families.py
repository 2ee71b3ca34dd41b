"""The families' export recipes on the tiny presets: Qwen-Image's VAE decode and encode and Z-Image's VAE decode on
ONNX Runtime and OpenVINO, and Wan's VAE decode as a step graph (its causal cache as inputs and outputs) on ONNX
Runtime, within the fp32 tolerance of the eager stage. The decodes of Qwen-Image and Z-Image have dynamic height and
width: one artifact serves a second size too, without a rebuild; the others are static, one per size."""

from __future__ import annotations

import pytest
import torch

from engine.backends.chain import stage_uses, with_backends
from engine.families import get_family
from engine.plan.model_check import component_configs
from tests.integration.engine_run import GRAPHS

CASES = [(family, task, stage, backend) for family, task, stage in
         (("qwen_image", "t2i", "vae_decode"), ("qwen_image", "edit", "vae_encode"), ("z_image", "t2i", "vae_decode"))
         for backend in ("onnxruntime", "openvino")]
CASES.append(("wan", "i2v", "vae_decode", "onnxruntime"))  # three graphs (first, second, later frames): the costliest
DYNAMIC = {("qwen_image", "vae_decode"), ("z_image", "vae_decode")}
LIMITS = {"height": 64, "width": 96, "num_frames": 9}


def stage_inputs(family_name: str, task: str, stage_name: str, request):
    if stage_name == "vae_encode":
        return {}
    if family_name == "wan":  # three latent frames: each of the step graphs runs
        return {"latents": torch.randn(1, 16, 3, request.height // 8, request.width // 8, generator=torch.Generator().manual_seed(1))}
    if family_name == "qwen_image":  # packed latents: [1, tokens, channels * 4]
        return {"latents": torch.randn(1, (request.height // 16) * (request.width // 16), 64,
                                       generator=torch.Generator().manual_seed(1))}
    return {"latents": torch.randn(1, 16, request.height // 8, request.width // 8, generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One cache for the module: onnxruntime and openvino build a stage from the same ONNX export."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.mark.parametrize("family_name, task, stage_name, backend", CASES)
def test_the_stage_on_a_graph_backend_matches_eager(family_name, task, stage_name, backend, artifacts, monkeypatch):
    monkeypatch.setenv("ENGINE_ARTIFACT_DIR", str(artifacts))
    family = get_family(family_name)
    source = family.resolve_source(task, "tiny")
    spec = next(s for s in family.stages(task) if s.name == stage_name)
    components = family.load_components(task, spec.components, source, "cpu", "float32")
    configs = component_configs(family, task, source)
    fields = {"prompt": "x", "height": 64, "width": 96}
    if stage_name == "vae_encode" or family_name == "wan":
        fields["image"] = GRAPHS / "assets" / "first_frame.png"
    if family_name == "wan":
        fields.update(height=48, width=64, num_frames=9)
    request = family.request_type(task).model_validate(fields)
    stage = with_backends(family.build_stage(task, stage_name, components, "cpu", "float32", configs), family, task,
                          "node", (backend, "eager"), True, components, "cpu", str(source), LIMITS)
    sizes = [request, request.model_copy(update={"height": 32, "width": 48})] if (family_name, stage_name) in DYNAMIC \
        else [request]
    for index, sized in enumerate(sizes):
        inputs = stage_inputs(family_name, task, stage_name, sized)
        expected = family.build_stage(task, stage_name, components, "cpu", "float32", configs).run(sized, inputs, None)
        outputs = stage.run(sized, inputs, None)
        use = stage_uses({stage_name: stage}, (stage_name,))[stage_name]
        assert use["used"] == backend and use["parity"]["passed"]
        for name, tensor in expected.items():
            assert outputs[name].shape == tensor.shape and (outputs[name] - tensor).abs().max() <= 3e-4
        if (family_name, stage_name) in DYNAMIC:  # one artifact from the smallest size to the limits
            assert use["shapes"].count("2..") == 2 and use["cache"] == ("resident" if index else "built")
            assert use["build_s"] == 0 or not index
        else:
            assert use["shapes"] == "static"
