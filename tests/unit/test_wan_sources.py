"""Wan model sources: presets built into the cache, local folders, repo ids; clear errors otherwise."""

from __future__ import annotations

import json

import pytest

from engine.errors import ModelError
from nodes.wan import family
from nodes.wan.presets import build_preset
from tests.unit.wan_support import tiny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_preset_is_built_once_into_the_cache(cache):
    folder = family.resolve_source("t2v", "tiny")
    built_at = (folder / "model_index.json").stat().st_mtime_ns

    again = family.resolve_source("t2v", "tiny")

    assert folder.is_relative_to(cache) and again == folder
    assert (again / "model_index.json").stat().st_mtime_ns == built_at
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert {"tokenizer", "text_encoder", "transformer", "vae", "scheduler"} <= set(index)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind


def test_i2v_preset_has_the_image_encoder(cache):
    folder = family.resolve_source("i2v", "tiny")

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert (folder / "image_processor" / "preprocessor_config.json").is_file()


def test_tiny_weights_are_the_same_in_every_build(tmp_path):
    build_preset("tiny", "t2v", tmp_path / "model")

    for component in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "model" / component).read_bytes() == (tiny("t2v") / component).read_bytes()


def test_bench_preset_carries_the_real_edge_widths(cache):
    folder = family.resolve_source("t2v", "bench")

    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert text["d_model"] == transformer["text_dim"] == 4096


def test_local_folder_is_used_as_is(cache):
    folder = family.resolve_source("t2v", "tiny")

    assert family.resolve_source("t2v", str(folder)) == folder


def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="nowhere"):
        family.resolve_source("t2v", str(tmp_path / "nowhere"))


def test_folder_without_model_index_is_a_model_error(tmp_path):
    (tmp_path / "vae").mkdir()

    with pytest.raises(ModelError, match="model_index.json"):
        family.resolve_source("t2v", str(tmp_path))


def test_unknown_repo_offline_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelError, match="Wan-AI/Wan2.1-T2V-0B-Nowhere.*hf download"):
        family.resolve_source("t2v", "Wan-AI/Wan2.1-T2V-0B-Nowhere")
