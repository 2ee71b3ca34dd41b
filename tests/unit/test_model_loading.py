"""engine.models.loading: whole components, parts of a module, and the meta-device byte prediction."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer, UMT5EncoderModel

from engine.errors import ModelError
from engine.models.loading import load_component, load_part, read_safetensors, torch_dtype
from engine.models.meta import parameter_bytes
from engine.stages import ComponentSpec, LoadedComponents
from tests.unit.wan_support import tiny

ENCODER_HALF = ComponentSpec("vae_encoder", "vae", prefixes=("encoder.", "quant_conv."))
DECODER_HALF = ComponentSpec("vae_decoder", "vae", prefixes=("decoder.", "post_quant_conv."))


@pytest.fixture(scope="module")
def source():
    return tiny("t2v")


@pytest.fixture(scope="module")
def whole_vae(source):
    return AutoencoderKLWan.from_pretrained(source / "vae")


def test_components_without_weights_load_whole(source):
    tokenizer = load_component(source, ComponentSpec("tokenizer", "tokenizer", weights=False), "cpu", "float32")
    scheduler = load_component(source, ComponentSpec("scheduler", "scheduler", weights=False), "cpu", "float32")

    assert isinstance(tokenizer, ByT5Tokenizer)
    assert isinstance(scheduler, UniPCMultistepScheduler) and scheduler.config.use_flow_sigmas


def test_whole_module_keeps_the_library_float32_modules(source):
    transformer = load_component(source, ComponentSpec("transformer", "transformer"), "cpu", "bfloat16")
    text_encoder = load_component(source, ComponentSpec("text_encoder", "text_encoder"), "cpu", "float16")

    assert isinstance(transformer, WanTransformer3DModel) and not transformer.training
    assert transformer.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert transformer.proj_out.weight.dtype == torch.bfloat16
    assert isinstance(text_encoder, UMT5EncoderModel)
    assert text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # fp16 only
    assert text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


def test_encoder_half_encodes_like_the_whole_vae_and_holds_nothing_else(source, whole_vae):
    half = load_component(source, ENCODER_HALF, "cpu", "float32")
    video = torch.randn(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0))

    assert isinstance(half, AutoencoderKLWan) and not half.training
    assert half.decoder is None and half.post_quant_conv is None
    assert torch.equal(half.encode(video).latent_dist.mode(), whole_vae.encode(video).latent_dist.mode())


def test_decoder_half_decodes_like_the_whole_vae(source, whole_vae):
    half = load_component(source, DECODER_HALF, "cpu", "float32")
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    assert half.encoder is None and half.quant_conv is None
    assert torch.equal(half.decode(latents).sample, whole_vae.decode(latents).sample)


def test_part_reads_only_its_keys(source):
    tensors = read_safetensors(source / "vae", ("decoder.", "post_quant_conv."))
    everything = load_file(source / "vae" / "diffusion_pytorch_model.safetensors")

    assert tensors and all(key.startswith(("decoder.", "post_quant_conv.")) for key in tensors)
    assert len(tensors) < len(everything)


def test_part_of_a_sharded_checkpoint(source, whole_vae, tmp_path):
    shutil.copytree(source, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "vae")
    whole_vae.save_pretrained(tmp_path / "model" / "vae", max_shard_size="100KB")
    assert list((tmp_path / "model" / "vae").glob("*.safetensors.index.json"))

    half = load_part(tmp_path / "model", "vae", ENCODER_HALF.prefixes, "cpu", torch.float32)

    assert torch.equal(half.encoder.conv_in.weight, whole_vae.encoder.conv_in.weight)


def test_missing_weights_are_a_model_error(source, tmp_path):
    shutil.copytree(source, tmp_path / "model")
    weights = tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    dropped = next(key for key in tensors if key.startswith("decoder."))
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)

    with pytest.raises(ModelError, match=dropped):
        load_component(tmp_path / "model", DECODER_HALF, "cpu", "float32")


def test_prefixes_must_name_whole_submodules(source):
    with pytest.raises(ModelError, match="do not name whole submodules"):
        load_part(source, "transformer", ("blocks.0.",), "cpu", torch.float32)


def test_missing_component_folder_and_bad_dtype(source, tmp_path):
    shutil.copytree(source, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "vae")

    with pytest.raises(ModelError, match="'vae' .*missing"):
        load_component(tmp_path / "model", DECODER_HALF, "cpu", "float32")
    with pytest.raises(ModelError, match="float64"):
        torch_dtype("float64")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "component",
    [ComponentSpec("transformer", "transformer"), ComponentSpec("text_encoder", "text_encoder"), ENCODER_HALF, DECODER_HALF],
    ids=lambda c: c.name,
)
def test_meta_prediction_equals_loaded_bytes(source, component, dtype):
    loaded = LoadedComponents({component.name: load_component(source, component, "cpu", dtype)})

    assert loaded.parameter_bytes()[component.name] == parameter_bytes(source, component, dtype)


def test_fixed_component_dtype_wins(source):
    fixed = ComponentSpec("vae_decoder", "vae", prefixes=DECODER_HALF.prefixes, dtype="float32")

    half = load_component(source, fixed, "cpu", "bfloat16")

    assert {p.dtype for p in half.parameters()} == {torch.float32}
    assert parameter_bytes(source, fixed, "bfloat16") == 2 * parameter_bytes(source, DECODER_HALF, "bfloat16")


def test_model_index_naming_another_library_is_refused(source, tmp_path):
    shutil.copytree(source, tmp_path / "model")
    index = tmp_path / "model" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "vae": ["os", "system"]}))

    with pytest.raises(ModelError, match="allowed"):
        load_component(tmp_path / "model", DECODER_HALF, "cpu", "float32")
