"""A Wan node holds only the weights of its stages, and the meta-device prediction of them is exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from engine.models.meta import parameter_bytes, parameter_count
from nodes.wan import family
from tests.unit.wan_support import PARTITIONS, load_node, node_components, tiny

ENCODER, TRANSFORMER, DECODER = PARTITIONS["three_nodes"]


def weight_names(components, name: str) -> list[str]:
    return [n for n, _ in components.objects[name].named_parameters()]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_transformer_node_holds_only_the_transformer(task):
    node = load_node(task, TRANSFORMER, "float32")

    assert set(node.objects) == {"transformer", "scheduler"}
    transformer = node.objects["transformer"]
    assert node.parameter_bytes()["scheduler"] == 0
    assert sum(p.numel() for p in transformer.parameters()) == parameter_count(tiny(task), family.components(task)["transformer"])
    assert [n for n, _ in transformer.named_buffers()] == ["rope.freqs_cos", "rope.freqs_sin"]  # counted in its bytes


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_decoder_node_holds_only_the_vae_decoder(task):
    node = load_node(task, DECODER, "float32")
    vae = node.objects["vae_decoder"]

    assert set(node.objects) == {"vae_decoder"}
    assert vae.encoder is None and vae.quant_conv is None
    assert all(n.startswith(("decoder.", "post_quant_conv.")) for n in weight_names(node, "vae_decoder"))


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_encoder_node_holds_no_dit_and_only_the_vae_encoder(task):
    node = load_node(task, ENCODER, "float32")

    expected = {"tokenizer", "text_encoder"} | ({"image_processor", "image_encoder", "vae_encoder"} if task == "i2v" else set())
    assert set(node.objects) == expected
    if task == "i2v":
        vae = node.objects["vae_encoder"]
        assert vae.decoder is None and vae.post_quant_conv is None
        assert all(n.startswith(("encoder.", "quant_conv.")) for n in weight_names(node, "vae_encoder"))


def test_vae_halves_partition_the_whole_vae():
    encoder = load_node("i2v", ENCODER, "float32").objects["vae_encoder"]
    decoder = load_node("i2v", DECODER, "float32").objects["vae_decoder"]
    whole = AutoencoderKLWan.from_pretrained(tiny("i2v") / "vae")

    held_by_encoder = {n for n, _ in encoder.named_parameters()}
    held_by_decoder = {n for n, _ in decoder.named_parameters()}
    assert held_by_encoder and held_by_decoder and not held_by_encoder & held_by_decoder
    assert held_by_encoder | held_by_decoder == {n for n, _ in whole.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("partition", ["three_nodes", "encoder_decoder+transformer", "one_node"])
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_node_bytes_are_the_sum_of_components_and_the_meta_prediction(task, partition, dtype):
    specs = family.components(task)
    for stages in PARTITIONS[partition]:
        node = load_node(task, stages, dtype)
        sizes = node.parameter_bytes()
        predicted = {name: parameter_bytes(tiny(task), specs[name], dtype) for name in node_components(task, stages)}

        assert sizes == predicted
        held = {id(t): t for obj in node.objects.values() if hasattr(obj, "parameters") for t in [*obj.parameters(), *obj.buffers()]}
        assert sum(sizes.values()) == sum(t.numel() * t.element_size() for t in held.values())


def test_vae_and_image_encoder_stay_float32_in_a_bfloat16_node():
    node = load_node("i2v", ENCODER, "bfloat16")

    assert node.objects["vae_encoder"].dtype == torch.float32
    assert node.objects["image_encoder"].dtype == torch.float32
    assert node.objects["text_encoder"].dtype == torch.bfloat16
