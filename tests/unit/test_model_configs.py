"""The shipped model configs in ``configs/`` build on the meta device to the published parameter counts.

Each preset folder holds only the JSON of a real checkpoint (no weights). ``engine plan`` sizes nodes from
these, so the counts must match the public figures of the real architectures (a tied embedding counted
once). Every folder under ``configs/`` must appear in ``EXPECTED``.
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from pathlib import Path

import pytest

from engine.models import meta
from engine.plan.model_check import component_configs
from engine.stages import ComponentSpec
from nodes.wan.family import WanFamily

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOLERANCE = 0.05
BF16 = 2

# Published parameter counts of the real architectures.
UMT5_XXL_ENCODER = 5.68e9
CLIP_VIT_H14_VISION = 0.63e9
WAN_VAE = 0.127e9
WAN_VAE_ENCODER = 0.054e9
WAN_VAE_DECODER = 0.073e9
WAN22_A14B_EXPERT = 14.3e9  # each of the two (57 GB of DiT in bf16 together)
WAN22_TI2V_5B_DIT = 5.0e9
# The Wan2.2 VAE (TI2V-5B): no published split; diffusers' AutoencoderKLWan at the repository's config.
WAN22_VAE_ENCODER = 0.150e9
WAN22_VAE_DECODER = 0.555e9
QWEN25_VL_7B = 8.3e9  # language model, lm_head and vision tower
QWEN_IMAGE_DIT = 20.4e9
QWEN3_4B = 4.02e9  # Qwen3Model (no lm_head; the embeddings are tied)
Z_IMAGE_DIT = 6.15e9
FLUX_VAE_ENCODER = 0.0343e9
FLUX_VAE_DECODER = 0.0495e9

_WAN_VAE = {"vae_encoder": WAN_VAE_ENCODER, "vae_decoder": WAN_VAE_DECODER}
_QWEN = {
    "text_encoder": QWEN25_VL_7B,
    "transformer": QWEN_IMAGE_DIT,
    # AutoencoderKLQwenImage is the Wan2.1 VAE architecture (same module names and sizes).
    **_WAN_VAE,
}
EXPECTED: dict[str, dict[str, float]] = {
    "wan2.1-t2v-1.3b": {"text_encoder": UMT5_XXL_ENCODER, "transformer": 1.42e9, **_WAN_VAE},
    "wan2.1-t2v-14b": {"text_encoder": UMT5_XXL_ENCODER, "transformer": 14.3e9, **_WAN_VAE},
    "wan2.1-i2v-14b-480p": {
        "text_encoder": UMT5_XXL_ENCODER,
        "image_encoder": CLIP_VIT_H14_VISION,
        "transformer": 16.4e9,
        **_WAN_VAE,
    },
    "wan2.2-i2v-a14b": {
        "text_encoder": UMT5_XXL_ENCODER,
        "transformer": WAN22_A14B_EXPERT,
        "transformer_2": WAN22_A14B_EXPERT,
        **_WAN_VAE,
    },
    "wan2.2-t2v-a14b": {
        "text_encoder": UMT5_XXL_ENCODER,
        "transformer": WAN22_A14B_EXPERT,
        "transformer_2": WAN22_A14B_EXPERT,
        "vae_decoder": WAN_VAE_DECODER,
    },
    "wan2.2-ti2v-5b": {"text_encoder": UMT5_XXL_ENCODER, "transformer": WAN22_TI2V_5B_DIT,
                       "vae_encoder": WAN22_VAE_ENCODER, "vae_decoder": WAN22_VAE_DECODER},
    "qwen-image": _QWEN,
    "qwen-image-edit": _QWEN,
    "z-image-turbo": {"text_encoder": QWEN3_4B, "transformer": Z_IMAGE_DIT, "vae_encoder": FLUX_VAE_ENCODER,
                      "vae_decoder": FLUX_VAE_DECODER},
}

_WAN = WanFamily()
# The Qwen-Image and Z-Image components follow the same diffusers layout and VAE split as Wan.
_QWEN_COMPONENTS = {
    "text_encoder": ComponentSpec("text_encoder", "text_encoder"),
    "transformer": ComponentSpec("transformer", "transformer"),
    "vae_encoder": ComponentSpec("vae_encoder", "vae", prefixes=("encoder.", "quant_conv.")),
    "vae_decoder": ComponentSpec("vae_decoder", "vae", prefixes=("decoder.", "post_quant_conv.")),
}


def components(folder: str) -> dict[str, ComponentSpec]:
    if folder.startswith("wan2.1-i2v"):
        specs = _WAN.components("i2v")
    elif folder.startswith("wan2.2-i2v"):
        specs = _WAN.components("i2v_experts")
    elif folder.startswith("wan2.2-t2v"):
        specs = _WAN.components("t2v_experts")
    elif folder.startswith(("wan2.1-t2v", "wan2.2-ti2v")):
        specs = _WAN.components("t2v")
    else:
        specs = _QWEN_COMPONENTS
    return {name: spec for name, spec in specs.items() if spec.weights}


@cache
def count(folder: str, component: str) -> int:
    return meta.parameter_count(CONFIGS / folder, components(folder)[component])


def preset_folders() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "model_index.json").is_file())


CASES = [(folder, name) for folder, counts in EXPECTED.items() for name in counts]


def test_every_preset_folder_has_expected_counts():
    assert preset_folders() == sorted(EXPECTED)
    for folder in EXPECTED:
        assert sorted(components(folder)) == sorted(EXPECTED[folder]), folder


@pytest.mark.parametrize(("folder", "component"), CASES, ids=[f"{f}:{c}" for f, c in CASES])
def test_parameter_count_matches_published(folder, component):
    expected = EXPECTED[folder][component]
    measured = count(folder, component)
    assert abs(measured - expected) <= TOLERANCE * expected, (
        f"{folder}/{component}: {measured / 1e9:.4f}B parameters, published {expected / 1e9:.3f}B"
    )


def test_wan_i2v_14b_node_weights_in_bf16():
    folder = "wan2.1-i2v-14b-480p"
    encoder_node = sum(count(folder, name) for name in ("text_encoder", "image_encoder", "vae_encoder")) * BF16
    transformer_node = count(folder, "transformer") * BF16
    assert abs(encoder_node - 12.8e9) <= TOLERANCE * 12.8e9, f"encoder node {encoder_node / 1e9:.2f} GB"
    assert abs(transformer_node - 32.8e9) <= TOLERANCE * 32.8e9, f"transformer node {transformer_node / 1e9:.2f} GB"


def test_vae_halves_cover_the_whole_vae():
    for folder in (folder for folder, counts in EXPECTED.items() if {"vae_encoder", "vae_decoder"} <= counts.keys()):
        whole = meta.parameter_count(CONFIGS / folder, ComponentSpec("vae", "vae"))
        assert count(folder, "vae_encoder") + count(folder, "vae_decoder") == whole, folder


# -- every key in a config is one its class takes (nothing silently ignored) ---------------------------------

_TRANSFORMERS_META_KEYS = {"architectures", "model_type", "dtype", "transformers_version"}


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _sub_config(config_cls: type, key: str) -> type:
    sub = config_cls.sub_configs_defaults[key]
    return getattr(sub, "config_class", sub)


def _model_components():
    for folder in preset_folders():
        index = meta.read_model_index(CONFIGS / folder)
        for name, entry in index.items():
            # entries are [library, class]; pipeline settings (Wan2.2's boundary_ratio) are plain values
            if not name.startswith("_") and isinstance(entry, list) and entry[0] in ("diffusers", "transformers"):
                yield folder, name, entry


@pytest.mark.parametrize(("folder", "component", "entry"), list(_model_components()))
def test_config_keys_are_all_accepted(folder, component, entry):
    library, class_name = entry
    cls = meta.component_class(CONFIGS / folder, component)
    path = CONFIGS / folder / component
    if library == "diffusers":
        _, unused, _ = cls.extract_init_dict(cls.load_config(path))
        assert not {k for k in unused if not k.startswith("_")}, f"{folder}/{component}: {class_name} ignores {unused}"
        return
    config_file = path / "config.json"
    if not config_file.is_file():  # tokenizer, image processor, processor: no model config
        return
    raw = json.loads(config_file.read_text())
    config_cls = cls.config_class
    accepted = _init_params(config_cls) | _TRANSFORMERS_META_KEYS
    if "text_config" in getattr(config_cls, "sub_configs_defaults", {}) and "text_config" not in raw:
        # Hub (flat) layout: the composite config moves the language-model keys into its text_config.
        accepted |= _init_params(_sub_config(config_cls, "text_config")) | {"rope_scaling", "rope_theta"}
    assert not set(raw) - accepted, f"{folder}/{component}: {config_cls.__name__} does not take {set(raw) - accepted}"
    if "vision_config" in raw:
        vision_accepted = _init_params(_sub_config(config_cls, "vision_config")) | _TRANSFORMERS_META_KEYS
        extra = set(raw["vision_config"]) - vision_accepted
        assert not extra, f"{folder}/{component}: vision_config does not take {extra}"


# -- the shapes the Wan family derives from these configs ------------------------------------------------------


def test_wan_i2v_shape_symbols_at_480p():
    folder = CONFIGS / "wan2.1-i2v-14b-480p"
    configs = component_configs(_WAN, "i2v", folder)  # the task's every weighted component, as the plan reads them
    request = _WAN.request_type("i2v")(prompt="x", image=Path("first.png"))
    symbols = _WAN.shape_symbols("i2v", configs, request)
    assert symbols["text_dim"] == 4096
    assert (symbols["z_dim"], symbols["latent_frames"], symbols["latent_h"], symbols["latent_w"]) == (16, 21, 60, 104)
    assert (symbols["image_tokens"], symbols["image_dim"]) == (257, 1280)
