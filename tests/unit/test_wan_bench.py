"""bench/gpu_wan_step.py: argument checks, the no-CUDA exit, a CPU smoke run, and the real run on a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.unit.wan_support import tiny

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_wan_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_wan_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_step_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--steps", "1"])

    assert "--steps must be at least 2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_exits_cleanly_without_cuda(bench, capsys):
    assert bench.main(["--json"]) == 0

    assert "CUDA is not available" in json.loads(capsys.readouterr().out)["skipped"]


def test_cpu_smoke_run_on_the_tiny_model(bench, capsys):
    code = bench.main(["--config", str(tiny("t2v")), "--device", "cpu", "--height", "32", "--width", "32",
                       "--frames", "5", "--steps", "3", "--repeats", "1", "--json"])

    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["tokens"] == 2 * 2 * 2
    assert result["step_seconds"]["engine"]["samples"] == result["step_seconds"]["diffusers"]["samples"] == 2
    assert result["ratio"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_size_step_on_the_gpu(bench, capsys):
    assert bench.main(["--steps", "3", "--repeats", "1", "--json"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 32760
    assert result["ratio"] <= 1.05  # the target is 1.02; one short run is noisier
