"""bench/: every script's options and --help, the figures they derive (percentiles, the pipelining bound, the
480P edge shapes, the timeline's bars), segment runs in the tracker and the report, and the GPU script's exit
without CUDA. No process is started here; tests/integration/test_bench_runs.py runs the scripts."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.controller.tracker import State, TrackedRequest
from nodes.wan.family import WanRequest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = ("overhead", "throughput", "control", "memory", "cold_start", "gpu_wan", "timeline", "monolithic", "hosts",
           "step_cache", "backends", "soak", "parallel")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help(name, capsys):
    module = load(name)
    entry = module.parse_args if hasattr(module, "parse_args") else module.main
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ("overhead", "throughput", "control", "memory", "cold_start", "gpu_wan", "hosts", "backends"))
def test_measuring_scripts_offer_json(name):
    assert load(name).parse_args(["--json"]).json is True


@pytest.mark.parametrize(("name", "argv", "message"), [
    ("overhead", ["--repeats", "0"], "--repeats must be at least 1"),
    ("throughput", ["--requests", "0"], "--requests must be at least 1"),
    ("control", ["--messages", "1"], "--messages must be at least 2"),
    ("cold_start", ["--repeats", "0"], "--repeats must be at least 1"),
    ("hosts", ["--repeats", "0"], "--repeats must be at least 1"),
    ("gpu_wan", ["--requests", "-1"], "--requests must be 0 or more"),
    ("backends", ["--sizes", "big"], "--sizes: got 'big'"),
])
def test_bad_counts_are_refused(name, argv, message, capsys):
    with pytest.raises(SystemExit):
        load(name).parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_gpu_script_exits_cleanly_without_cuda(capsys):
    assert load("gpu_wan").main(["--json"]) == 0
    assert "CUDA is not available" in json.loads(capsys.readouterr().out)["skipped"]


def test_percentiles_interpolate_between_ranks():
    common = load("common")
    values = [float(v) for v in range(1, 101)]
    assert common.percentile(values, 50) == pytest.approx(50.5)
    assert common.percentile(values, 99) == pytest.approx(99.01)
    assert common.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        common.percentile([], 50)


def test_the_bench_preset_edges_carry_the_real_480p_shapes():
    common = load("common")
    for task in ("i2v", "t2v"):
        checked = common.edges_at_480p(common.graph_path(task), ["model.path=bench"], task)
        assert checked["ok"], checked
    i2v = common.edges_at_480p(common.graph_path("i2v"), ["model.path=bench"], "i2v")
    assert i2v["edges"]["phase1"]["condition"] == [1, 20, 21, 60, 104]
    assert i2v["edges"]["phase2"]["latents"] == [1, 16, 21, 60, 104]
    assert i2v["payload_bytes"]["phase2"] == 16 * 21 * 60 * 104 * 4


def test_the_tiny_preset_is_not_mistaken_for_480p():
    common = load("common")
    assert not common.edges_at_480p(common.graph_path("t2v"), ["model.path=tiny"], "t2v")["ok"]


def test_serial_overrides_leave_one_request_in_flight():
    common = load("common")
    graph = common.graph_path("i2v")
    plan, _, _ = common.plan_graph(graph, common.serial_overrides(graph, ["model.path=tiny"]))
    assert [e.slots for e in plan.edges] == [1, 1]


def test_pipeline_bound_takes_the_slower_of_the_slowest_node_and_the_cores():
    throughput, common = load("throughput"), load("common")
    plan, _, _ = common.plan_graph(common.graph_path("i2v"), ["model.path=tiny"])
    stages = {"text_encode": 1.0, "image_encode": 0.5, "vae_encode": 0.5, "denoise": 3.0, "vae_decode": 1.5, "write": 0.5}
    bound = throughput.pipeline_bound(plan, stages, {"phase1": 0.1, "phase2": 0.0}, 7.0, worker_threads=1, n_cores=2)
    assert bound["node_seconds"] == pytest.approx({"encoder": 2.1, "transformer": 3.0, "decoder": 2.0})
    assert bound["stages_bound"] == pytest.approx(7.1 / 3.0)
    assert bound["period_seconds"] == pytest.approx(7.1 / 2) and bound["bound"] == pytest.approx(7.0 / 3.55)
    # Workers that each take every core cannot overlap: nothing to gain.
    assert throughput.pipeline_bound(plan, stages, {}, 7.0, worker_threads=2, n_cores=2)["bound"] == pytest.approx(1.0)
    # Enough cores: the slowest node sets the pace.
    assert throughput.pipeline_bound(plan, stages, {}, 7.0, worker_threads=1, n_cores=8)["bound"] == pytest.approx(7.0 / 3.0)


def test_workers_share_the_cores():
    throughput, common = load("throughput"), load("common")
    plan, _, _ = common.plan_graph(common.graph_path("i2v"), ["model.path=tiny"])
    assert [throughput.default_worker_threads(plan, n) for n in (1, 2, 3, 16)] == [1, 1, 1, 5]


# -- segment runs: tracker -> report -> timeline -----------------------------------------------------------------

def tracked(request_id: str, replicas: list[int]) -> TrackedRequest:
    """A request walked through three segments on the given replicas, as the controller does it."""
    request = TrackedRequest(request_id, WanRequest(prompt="a cat"), time.monotonic())
    for index, replica in enumerate(replicas):
        request.segment, request.replica_of[index] = index, replica
        request.dispatched_at = time.monotonic()
        request.move(State.RUNNING, f"segment {index}")
    request.move(State.DONE, "written")
    return request


def test_the_tracker_records_each_segment_run():
    request = tracked("r1", [0, 1, 0])
    assert [(r.segment, r.replica, r.outcome) for r in request.runs] == [(0, 0, "done"), (1, 1, "done"), (2, 0, "done")]
    assert all(r.dispatched <= r.done for r in request.runs)
    assert [r.done for r in request.runs[:-1]] == [r.dispatched for r in request.runs[1:]]


def test_a_retry_and_a_failure_close_the_running_segment():
    request = TrackedRequest("r1", WanRequest(prompt="a cat"), time.monotonic())
    request.segment, request.replica_of[0] = 0, 1
    request.move(State.RUNNING, "encoder")
    request.attempt += 1
    request.move(State.QUEUED, "retrying")
    request.replica_of = {0: 0}
    request.move(State.RUNNING, "encoder again")
    request.move(State.FAILED, "gave up")
    assert [(r.replica, r.attempt, r.outcome) for r in request.runs] == [(1, 0, "retried"), (0, 1, "failed")]


def test_the_report_names_node_replica_and_stages_of_each_segment():
    from engine.controller.report import build_report

    common = load("common")
    plan, _, source = common.plan_graph(common.graph_path("i2v"), ["model.path=tiny"])
    request = tracked("r1", [0, 0, 0])
    result = SimpleNamespace(run_id="t", requests=[request], replicas={}, started=request.clock_zero - 2.0, ready_s=2.0,
                             seconds=3.0, out_dir=Path("/nonexistent"), refused={}, broker_reconnects=0,
                             plan=plan)
    report = build_report(result, plan, source)
    (entry,) = report["requests"]
    assert entry["submitted_seconds"] == pytest.approx(2.0)
    assert [(s["node"], s["stages"]) for s in entry["segments"]] == [
        ("encoder", ["text_encode", "image_encode", "vae_encode"]), ("transformer", ["denoise"]), ("decoder", ["vae_decode"])]


def test_timeline_bars_follow_each_replica_queue(tmp_path):
    timeline = load("timeline")

    def request(rid, segments, stage_seconds):
        return {"id": rid, "submitted_seconds": 10.0, "stage_seconds": stage_seconds,
                "edges": {"phase1": {"seconds": 0.1}, "phase2": {"seconds": 0.05}},
                "segments": [{"segment": i, "node": node, "replica": 0, "stages": stages, "attempt": 0,
                              "dispatched": start, "done": end, "outcome": "done"}
                             for i, (node, stages, start, end) in enumerate(segments)]}

    stages = {"text_encode": 0.5, "denoise": 1.0, "vae_decode": 0.4}
    report = {"run_id": "t", "graph": {"name": "g"},
              "nodes": [{"node": n, "replica": 0} for n in ("encoder", "transformer", "decoder")],
              "edges": [{"name": "phase1", "from": "encoder", "to": "transformer"},
                        {"name": "phase2", "from": "transformer", "to": "decoder"}],
              "requests": [
                  request("r1", [("encoder", ["text_encode"], 0.0, 0.6), ("transformer", ["denoise"], 0.6, 1.7),
                                 ("decoder", ["vae_decode"], 1.7, 2.2)], stages),
                  # r2 is dispatched with r1 but waits for the encoder to finish r1.
                  request("r2", [("encoder", ["text_encode"], 0.0, 1.2), ("transformer", ["denoise"], 1.7, 2.8),
                                 ("decoder", ["vae_decode"], 2.8, 3.3)], stages)]}
    bars = timeline.bars(report)
    r2_encode = next(b for b in bars if b["request"] == "r2" and b["name"] == "text_encode")
    assert r2_encode["start"] == pytest.approx(10.6) and r2_encode["end"] == pytest.approx(11.1)
    transfers = [b for b in bars if b["kind"] == "transfer" and b["request"] == "r1"]
    assert [(b["name"], b["lane"]) for b in transfers] == [("phase1", ("encoder", 0)), ("phase2", ("transformer", 0))]
    assert len([b for b in bars if b["kind"] == "segment"]) == 6
    pytest.importorskip("matplotlib")
    assert timeline.draw(report, tmp_path / "timeline.png").stat().st_size > 0


def test_soak_fits_the_growth_per_job_after_warm_up_and_renders_a_table():
    soak = load("soak")

    def sample(seconds: float, jobs: int, decoder_rss: int, worker_rss: int) -> dict:
        return {"seconds": seconds, "jobs_completed": jobs, "processes": {
            "decoder-0": {"rss_bytes": decoder_rss, "rss_peak_bytes": decoder_rss + (60 << 20), "open_files": 19},
            "transformer-0": {"rss_bytes": worker_rss, "rss_peak_bytes": worker_rss, "open_files": 20}}}

    # The decoder grows 4 KiB a job under a request's swing; the transformer is flat after warm-up.
    swing = [0, 3 << 20, -2 << 20, 1 << 20, 0]
    samples = [sample(0, 0, 400 << 20, 300 << 20)] + [
        sample(30 * i, 100 * i, (500 << 20) + 4096 * 100 * i + swing[i % 5], 480 << 20) for i in range(1, 21)]
    grown = soak.growth(samples, warmup_s=60)
    assert grown["from_seconds"] == 60 and grown["jobs"] == 1800 and grown["samples"] == 19
    assert abs(grown["processes"]["decoder-0"]["rss_bytes_per_job"] - 4096) < 1024
    assert grown["processes"]["transformer-0"]["rss_bytes_per_job"] == 0
    assert grown["processes"]["transformer-0"]["rss_growth_bytes"] == 0
    result = {"graph": "g", "model": "tiny", "clients": 4, "minutes": 10, "completed": 2000, "failed": 0, "failures": [],
              "growth": grown, "samples": samples, "ready_seconds": 9.0, "exit_code": 0,
              "machine": {"cpu": "c", "cores": 2, "memory_gib": 1, "torch": "t", "torch_threads": 1, "loadavg_start": 0.0}}
    table = soak.render(result)
    assert "decoder-0" in table and "KiB per job (fit)" in table and "+0.00" in table


def test_the_streaming_bench_has_help_json_and_refuses_a_bad_size(capsys):
    streaming = load("streaming")
    with pytest.raises(SystemExit) as exit_info:
        streaming.parse_args(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
    args = streaming.parse_args(["--json", "--sizes", "48x64x9,128x224x17"])
    assert args.json is True and args.sizes == [(48, 64, 9), (128, 224, 17)]
    with pytest.raises(SystemExit):
        streaming.parse_args(["--sizes", "48x64"])
    assert "--sizes: each size is HxWxF" in capsys.readouterr().err
    assert streaming.first_fragment_end(b"") is False


def test_the_serving_bench_compares_each_service_with_the_pipeline_around_it():
    serve = load("serve")
    before, after = {"jobs_per_minute": 40.0, "p50_seconds": 1.5}, {"jobs_per_minute": 30.0, "p50_seconds": 2.5}
    assert serve.bracketing([before, after]) == {"jobs_per_minute": 35.0, "p50_seconds": 2.0}

    node = {"segments": 2, "busy_seconds": 3.0, "queue_wait_seconds": 0.5, "peak_replicas": 1}
    rate = {"load": 0.5, "offered_jobs_per_minute": 20.0, "jobs_per_minute": 17.5, "p50_seconds": 2.6,
            "p99_seconds": 3.0, "failed": 0, "failures": [], "scaling": [], "nodes": {"decoder": node}}
    pipeline = {**before, "p99_seconds": 1.6, "torch_threads": 2}
    result = {"graph": "g", "nodes": {"decoder": 1}, "model": "tiny", "seed": 0, "arrivals": "poisson", "jobs": 2,
              "warmup": 1, "worker_threads": None, "request": {"height": 128, "width": 224, "frames": 17, "steps": 4},
              "elastic": {"node": "decoder", "max_replicas": 2, "window_s": 3.0, "in_window_s": 20.0},
              "services": {"fixed": {"ready_seconds": 9.0, "exit_code": 0, "baseline": serve.bracketing([before, after]),
                                     "rates": [rate]}},
              "monolithic": pipeline, "monolithic_runs": [pipeline, {**after, "p99_seconds": 2.6, "torch_threads": 2}],
              "machine": {"cpu": "c", "cores": 2, "memory_gib": 1, "torch": "t", "torch_threads": 2, "loadavg_start": 0.0}}
    text = serve.render(result)
    assert "40.0 jobs/min, p50 1.50 s, then 30.0 jobs/min, p50 2.50 s" in text
    ratios = next(line for line in text.splitlines() if line.startswith("fixed") and "0.5x" in line and "1.30x" in line)
    assert "0.50x" in ratios  # 17.5 jobs/min against the pipelines' mean of 35, p50 2.6 s against their 2.0 s
    assert "33% (unsteady machine)" in ratios  # 40 then 30 jobs/min around it
