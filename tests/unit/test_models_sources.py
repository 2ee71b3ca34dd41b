"""Preset builds are atomic: a reader never sees a half-built folder, and a lost race keeps the winner's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.models.sources import Preset, build_preset, cache_root


def write_model(folder: Path, marker: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": marker}))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_built_once_under_family_name_and_version(cache):
    calls: list[Path] = []
    preset = Preset(build=lambda folder: (calls.append(folder), write_model(folder, "A")), version=3)
    first = build_preset("fam/t2i", "tiny", preset)
    assert first == cache_root() / "fam" / "t2i" / "tiny-v3" == cache / "fam" / "t2i" / "tiny-v3"
    assert build_preset("fam/t2i", "tiny", preset) == first and len(calls) == 1
    assert calls[0] != first  # built elsewhere, then moved into place
    assert sorted(p.name for p in first.parent.iterdir()) == ["tiny-v3"]  # no staging folder left


def test_a_lost_race_keeps_the_winners_folder(cache):
    target = cache / "fam" / "tiny-v1"

    def build_while_another_worker_finishes(folder: Path) -> None:
        write_model(target, "winner")
        write_model(folder, "loser")

    assert build_preset("fam", "tiny", Preset(build=build_while_another_worker_finishes, version=1)) == target
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-v1"]


def test_a_failed_build_leaves_nothing_behind(cache):
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        build_preset("fam", "tiny", Preset(build=broken, version=1))
    with pytest.raises(ModelError, match="model_index.json is missing"):
        build_preset("fam", "tiny", Preset(build=lambda folder: None, version=1))
    assert list((cache / "fam").iterdir()) == []
