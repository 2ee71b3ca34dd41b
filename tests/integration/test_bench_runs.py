"""bench/ scripts run end to end with --json on the tiny model (real workers, broker, Mooncake, the monolithic
pipeline in its own process): the JSON has the figures the README quotes, with sane values. Nothing is timed
against a target here: the figures depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]


def bench(script: str, *argv: str, timeout: float = 280) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *argv, "--json"], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_control_plane_percentiles_on_amqtt():
    result = bench("control", "--messages", "30", "--brokers", "amqtt", "--no-transport")
    figures = result["brokers"]["amqtt"]
    assert figures["messages"] == 30
    for name in ("dispatch", "publish_ack", "round_trip"):
        assert 0 < figures[name]["p50_ms"] <= figures[name]["p99_ms"] <= figures[name]["max_ms"]
    assert figures["dispatch"]["p50_ms"] < figures["round_trip"]["p50_ms"]
    assert result["machine"]["cores"] >= 1


def test_overhead_compares_a_deployed_graph_with_the_pipeline(tmp_path):
    result = bench("overhead", *TINY, "--repeats", "1", "--out", str(tmp_path))
    assert len(result["engine"]["latency_seconds"]) == len(result["monolithic"]["latency_seconds"]) == 1
    assert result["ratio"] == pytest.approx(result["engine"]["median_seconds"] / result["monolithic"]["median_seconds"])
    assert result["frames_max_abs_diff"] == 0.0  # the engine is bit-identical to the pipeline on CPU
    assert set(result["engine"]["stage_seconds"]) == {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode"}
    assert all(edge["nbytes"] > 0 for edge in result["engine"]["edges"].values())
    assert result["edges_480p"]["ok"] is False  # the tiny model's widths are not Wan2.1's
    assert (tmp_path / "engine" / "report.json").is_file()


def test_throughput_runs_both_sides_and_draws_the_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    result = bench("throughput", *TINY, "--requests", "3", "--out", str(tmp_path))
    assert len(result["engine"]["latency_seconds"]) == len(result["monolithic"]["latency_seconds"]) == 3
    assert result["speedup"] == pytest.approx(result["monolithic"]["seconds"] / result["engine"]["seconds"])
    assert 0 < result["bound"]["bound"] and result["bound"]["stages_bound"] >= 1.0
    assert set(result["bound"]["node_seconds"]) == {"encoder", "transformer", "decoder"}
    assert Path(result["timeline_png"]).stat().st_size > 0


def test_serve_takes_open_loop_jobs_at_two_rates_beside_the_pipeline(tmp_path):
    result = bench("serve", *TINY, "--jobs", "3", "--loads", "1", "2", "--variants", "elastic", "--out", str(tmp_path))
    service = result["services"]["elastic"]
    rates = service["rates"]
    assert [r["load"] for r in rates] == pytest.approx([1.0, 2.0])
    for rate in rates:
        assert rate["jobs"] == rate["completed"] == 3 and rate["failed"] == 0 and rate["failures"] == []
        assert 0 < rate["p50_seconds"] <= rate["p99_seconds"] <= rate["seconds"] and rate["jobs_per_minute"] > 0
        # per node, from /metrics around the rate: every job's segment, the seconds busy and waiting
        assert {node: n["segments"] for node, n in rate["nodes"].items()} == {"encoder": 3, "transformer": 3, "decoder": 3}
        assert all(n["busy_seconds"] > 0 and n["queue_wait_seconds"] >= 0 for n in rate["nodes"].values())
        assert 1 <= rate["nodes"]["decoder"]["peak_replicas"] <= 2
        # every job has the benchmark's prompt, encoded once by the warm-up job: each job's prompt and negative prompt
        # embeddings are hits
        assert rate["output_cache"]["hits"] == 2 * 3 and rate["output_cache"]["misses"] == 0
    monolithic = result["monolithic"]
    assert len(monolithic["latency_seconds"]) == 3 and len(monolithic["warmup_seconds"]) == 1
    assert result["capacity_jobs_per_minute"] == pytest.approx(monolithic["jobs_per_minute"])
    assert result["nodes"] == {"encoder": 1, "transformer": 2, "decoder": 1}
    assert service["exit_code"] == 0  # stopped with SIGTERM, drained
    assert len(list((tmp_path / "elastic" / "state" / "outputs").glob("video_*.mp4"))) == 1 + 2 * 3  # stream files go once their job completes  # warm-up, both rates


def test_cache_counts_hits_on_a_trace_of_repeated_prompts_and_changes_no_frame(tmp_path):
    result = bench("cache", *TINY, "--requests", "3", "--prompts", "2", "--out", str(tmp_path))
    cached, uncached = result["cached"], result["uncached"]
    # r3 repeats r1's prompt; r2 and r3 reuse r1's negative prompt
    assert cached["parts"] == {"text_encode/prompt": {"hits": 1, "misses": 2},
                               "text_encode/negative_prompt": {"hits": 2, "misses": 1}}
    assert (cached["hits"], cached["misses"]) == (3, 3) and cached["saved_seconds"] > 0
    assert cached["text_encode_seconds"]["negative"] is not None  # r2: a new prompt, the negative prompt's hit
    assert (uncached["hits"], uncached["misses"]) == (0, 0)  # no cache, no cacheable stage counted
    assert result["frames_equal"] is True


def test_memory_and_cold_start_per_node(tmp_path):
    memory = bench("memory", *TINY, "--out", str(tmp_path / "memory"))
    assert [n["node"] for n in memory["nodes"]] == ["encoder", "transformer", "decoder"]
    assert memory["engine"]["param_bytes"] == memory["monolithic"]["param_bytes"]  # the same weights, split
    assert all(n["peak_rss_bytes"] > memory["imports_only_rss_bytes"] / 2 for n in memory["nodes"])
    assert memory["real_checkpoint"]["node_weight_bytes"]["transformer"] > 30e9  # Wan2.1-I2V-14B in bf16

    cold = bench("cold_start", "--model", "tiny", "--repeats", "1", "--out", str(tmp_path / "cold"))
    assert set(cold["nodes"]) == {"encoder[0]", "transformer[0]", "decoder[0]"}
    for node in cold["nodes"].values():
        assert 0 < node["start_to_connected"] < node["start_to_ready"] and 0 <= node["load"] < node["start_to_ready"]
    assert cold["monolithic"]["start_to_ready"] > cold["monolithic"]["start_to_imported"] > 0


def test_gpu_script_smoke_run_on_the_cpu_with_a_tiny_config(tmp_path):
    from engine.families import get_family

    config = get_family("wan").resolve_source("t2v", "tiny")  # its config.json files; the script builds its own weights
    result = bench("gpu_wan", "--device", "cpu", "--config", str(config), "--dtype", "fp32", "--height", "32", "--width", "32",
                   "--frames", "5", "--steps", "2", "--repeats", "1", "--requests", "2", "--out", str(tmp_path))
    assert result["overhead"]["ratio"] > 0 and len(result["overhead"]["engine_seconds"]) == 1
    assert result["throughput"]["requests"] == 2 and result["throughput"]["speedup"] > 0
    assert set(result["memory"]["nodes"]) == {"encoder[0]", "transformer[0]", "decoder[0]"}
    assert not (tmp_path / "model").exists()  # the built model is removed unless --keep-model
