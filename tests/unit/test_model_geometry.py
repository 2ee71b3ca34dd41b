"""A model's latent geometry comes from its configs: the families check it, `engine validate` and `engine plan`
refuse what a family cannot run (naming the config field), and stages that do not hold the VAE take it from
the configs rather than from diffusers' defaults.

Checkpoint configs here are copies of ``configs/`` (no weights) with fields changed, as a user's model folder
of another geometry would have them; the stage tests build tiny random-weight models of that geometry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli import main
from engine.families import get_family
from engine.plan.model_check import component_configs
from engine.plan.shapes import evaluate_shape
from engine.stages import MODEL_DTYPE
from tests.unit.geometry_support import GEOMETRIES, TASKS, build_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
GRAPHS = {("wan", "t2v"): "graphs/wan_t2v.yaml", ("wan", "i2v"): "graphs/wan_i2v.yaml",
          ("qwen_image", "t2i"): "graphs/qwen_image_t2i.yaml", ("qwen_image", "edit"): "graphs/qwen_image_edit.yaml"}
SHIPPED = [("wan2.1-t2v-1.3b", "wan", "t2v"), ("wan2.1-t2v-14b", "wan", "t2v"), ("wan2.1-i2v-14b-480p", "wan", "i2v"),
           ("wan2.2-ti2v-5b", "wan", "t2v"),
           ("qwen-image", "qwen_image", "t2i"), ("qwen-image-edit", "qwen_image", "edit")]


def model_folder(tmp_path: Path, name: str, changes: dict[str, dict[str, Any]]) -> Path:
    """A copy of ``configs/<name>`` with ``changes`` (folder -> {field: value}; a value of None removes it)."""
    folder = tmp_path / name
    shutil.copytree(CONFIGS / name, folder)
    for component, fields in changes.items():
        path = folder / component / "config.json"
        config = json.loads(path.read_text())
        config.update(fields)
        path.write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    return folder


def stats(z_dim: int) -> dict[str, list[float]]:
    return {"latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}


@pytest.mark.parametrize(("name", "family", "task"), SHIPPED)
def test_the_real_checkpoints_configs_fit_their_family(name, family, task):
    configs = component_configs(get_family(family), task, CONFIGS / name)
    assert get_family(family).check_configs(task, configs) == []


REFUSED = [
    pytest.param("wan2.1-t2v-1.3b", "wan", "t2v", {"vae": {"temperal_downsample": [True, True], "dim_mult": [1, 2, 4]}},
                 ["MODEL/vae/config.json scale_factor_spatial: 8, but the VAE compresses 4x (temperal_downsample [True, True])"],
                 id="wan-4x-vae-without-its-stride-field"),
    pytest.param("wan2.1-t2v-1.3b", "wan", "t2v", {"vae": {"scale_factor_temporal": 8, "temperal_downsample": [True, True, True]}},
                 ["MODEL/vae/config.json scale_factor_temporal: 8; it must divide 4 (requests have 4k+1 frames)"], id="wan-8x-in-time"),
    pytest.param("wan2.1-i2v-14b-480p", "wan", "i2v", {"vae": {"z_dim": 8, **stats(8)}, "transformer": {"out_channels": 8}},
                 ["MODEL/transformer/config.json in_channels: 36; i2v with vae z_dim = 8 feeds it 20"], id="wan-i2v-transformer-of-16-channels"),
    pytest.param("wan2.1-t2v-1.3b", "wan", "t2v", {"vae": {"z_dim": 8}, "transformer": {"in_channels": 8, "out_channels": 8}},
                 ["MODEL/vae/config.json latents_mean: 16 values for vae z_dim = 8 latent channels",
                  "MODEL/vae/config.json latents_std: 16 values for vae z_dim = 8 latent channels"], id="wan-statistics-of-16-channels"),
    pytest.param("qwen-image", "qwen_image", "t2i", {"vae": {"z_dim": 8, **stats(8)}},
                 ["MODEL/transformer/config.json in_channels: 64; packed latents of vae z_dim = 8 channels have 32",
                  "MODEL/transformer/config.json out_channels: 16; the transformer predicts the vae's z_dim = 8 channels"],
                 id="qwen-transformer-of-16-channels"),
    pytest.param("qwen-image-edit", "qwen_image", "edit",
                 {"vae": {"temperal_downsample": [False, True, True, True], "dim_mult": [1, 2, 4, 4, 4]}},
                 ["MODEL/vae/config.json temperal_downsample: 4 downsamplings: a packed latent token covers 32 pixels, which "
                  "must divide 16"], id="qwen-16x-vae"),
    pytest.param("qwen-image", "qwen_image", "t2i", {"vae": {"z_dim": None}, "transformer": {"patch_size": "2"}},
                 ["MODEL/vae/config.json z_dim: missing", "MODEL/transformer/config.json patch_size: expected int, got '2'"],
                 id="qwen-missing-and-ill-typed-fields"),
    pytest.param("wan2.1-t2v-1.3b", "wan", "t2v", {"text_encoder": {"d_model": 0}},
                 [f"stage 'text_encode' output '{name}' would be empty: shape [1, 512, 0] for [batch, text_len, text_dim] "
                  "at the largest request" for name in ("prompt_embeds", "negative_prompt_embeds")], id="wan-empty-output"),
    pytest.param("wan2.1-t2v-1.3b", "wan", "t2v", {"text_encoder": {"d_model": None}},
                 ["a component config lacks 'd_model', needed for the tensor shapes"], id="wan-field-only-the-shapes-read"),
]


@pytest.mark.parametrize(("name", "family", "task", "changes", "problems"), REFUSED)
def test_validate_and_plan_refuse_what_the_family_cannot_run_naming_the_field(tmp_path, capsys, name, family, task,
                                                                            changes, problems):
    folder = model_folder(tmp_path, name, changes)
    for command in ("validate", "plan"):
        code = main([command, GRAPHS[family, task], "--set", f"model.path={folder}"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert err.startswith(f"error: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the graph:"), err
        for problem in problems:
            where = f"{GRAPHS[family, task]} (--set model.path={folder}) model.path"
            assert f"{where}: {family} {task} cannot run this model: {problem.replace('MODEL', str(folder))}" in err, err


def test_validate_says_what_it_checked(tmp_path, capsys, monkeypatch):
    assert main(["validate", "graphs/wan_t2v.yaml", "--set", "model.path=configs/wan2.1-t2v-1.3b"]) == 0
    assert "model configs/wan2.1-t2v-1.3b: its configs fit wan t2v" in capsys.readouterr().out

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert main(["validate", "graphs/wan_t2v.yaml"]) == 0
    out = capsys.readouterr().out
    assert "model tiny: a preset not built yet; `engine plan` or `engine run` builds it and checks its configs" in out
    assert not (tmp_path / "empty-cache").exists()  # validate builds nothing

    assert main(["validate", "graphs/wan_t2v.yaml", "--set", f"model.path={tmp_path / 'nothing'}"]) == 1
    assert "is not a preset of wan/t2v (tiny, bench, tiny-ti2v), an existing folder, or a repo id" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "family", "task", "changes", "tokens"), [
    ("qwen-image", "qwen_image", "t2i", {}, (480 // 16) * (832 // 16)),
    ("qwen-image", "qwen_image", "t2i", {"vae": {"temperal_downsample": [False, True], "dim_mult": [1, 2, 4]}},
     (480 // 8) * (832 // 8)),
    ("wan2.1-t2v-1.3b", "wan", "t2v", {}, (480 // 8) * (832 // 8)),
    ("wan2.1-t2v-1.3b", "wan", "t2v",
     {"vae": {"temperal_downsample": [True, True], "dim_mult": [1, 2, 4], "scale_factor_spatial": 4}}, (480 // 4) * (832 // 4)),
])
def test_latent_sizes_follow_the_vae_downsampling(tmp_path, name, family, task, changes, tokens):
    folder = model_folder(tmp_path, name, changes)
    request = get_family(family).request_type(task)(prompt="x", height=480, width=832)
    symbols = get_family(family).shape_symbols(task, component_configs(get_family(family), task, folder), request)
    latent = symbols["latent_tokens"] if family == "qwen_image" else symbols["latent_h"] * symbols["latent_w"]
    assert latent == tokens


# -- stages that do not hold the VAE ---------------------------------------------------------------------

@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize(("family", "task"), TASKS)
def test_denoise_without_the_vae_produces_the_declared_latents(tmp_path, family, task, geometry):
    """The denoising stage holds no VAE: fed inputs of their declared shapes for a request, it returns latents
    of the declared shape for this model (diffusers' defaults would give 16 channels at 8x)."""
    source = build_model(family, task, geometry, tmp_path / "model")
    model = get_family(family)
    configs = component_configs(model, task, source)
    assert model.check_configs(task, configs) == []
    fields: dict[str, Any] = {"prompt": "x", "height": 48, "width": 80, "steps": 2}
    if family == "wan":
        fields["num_frames"] = 5
    if task in ("edit", "i2v"):
        from PIL import Image

        Image.new("RGB", (40, 24)).save(tmp_path / "in.png")
        fields["image"] = tmp_path / "in.png"
    request = model.request_type(task)(**fields)
    symbols = model.shape_symbols(task, configs, request)
    stages = {stage.name: stage for stage in model.stages(task)}
    declared = {tensor.name: tensor for stage in stages.values() for tensor in stage.outputs}

    def tensor_for(name: str) -> torch.Tensor:
        spec = declared[name]
        shape = list(evaluate_shape(spec.shape, symbols))
        for dim in spec.variable:  # a real prompt or input image is shorter than the bound
            shape[dim] = min(shape[dim], 6)
        dtype = torch.float32 if spec.dtype == MODEL_DTYPE else getattr(torch, spec.dtype)
        return torch.ones(shape, dtype=dtype) if dtype == torch.int64 else torch.randn(shape).to(dtype)

    denoise = stages["denoise"]
    components = model.load_components(task, denoise.components, source, "cpu", "float32")
    stage = model.build_stage(task, "denoise", components, "cpu", "float32", configs)
    inputs = {name: tensor_for(name) for name in denoise.inputs}
    latents = stage.run(request, inputs, lambda step, total: None)["latents"]
    assert tuple(latents.shape) == evaluate_shape(declared["latents"].shape, symbols)
