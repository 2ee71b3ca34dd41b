"""The ``engine`` console script, run as a user runs it: in a subprocess, reading its exit code and output.

``engine plan`` on Wan2.1-I2V-14B in bf16 is the Foundation's acceptance check: node weights from the
shipped configs on the meta device, edge slots from the shape expressions at 480x832, 81 frames.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path

import pytest

from engine.plan.build import plan_graph
from engine.plan.model import PAYLOAD_ALIGNMENT, align
from engine.spec.schema import EdgeSpec

ROOT = Path(__file__).resolve().parents[2]
ENGINE = shutil.which("engine")
TOLERANCE = 0.05

I2V_14B = [
    "--set", "model.path=configs/wan2.1-i2v-14b-480p", "--set", "model.dtype=bf16",
    "--set", "limits.height=480", "--set", "limits.width=832", "--set", "limits.num_frames=81",
    "--set", "nodes.encoder.place.memory=80GiB", "--set", "nodes.transformer.place.memory=80GiB",
    "--set", "nodes.decoder.place.memory=80GiB",
]
# Slot contents at 480x832, 81 frames: latent 21 frames of 60x104 (VAE: 4x in time, 8x in space).
BF16, FP32 = 2, 4
PHASE1 = {
    "prompt_embeds": 1 * 512 * 4096 * BF16,  # umT5-XXL, padded to 512 tokens
    "negative_prompt_embeds": 1 * 512 * 4096 * BF16,
    "image_embeds": 1 * 257 * 1280 * BF16,  # CLIP ViT-H/14 at 224: 16x16 patches + class token
    "condition": 1 * (4 + 16) * 21 * 60 * 104 * BF16,  # first-frame mask (t_scale channels) + VAE latent
}
PHASE2 = {"latents": 1 * 16 * 21 * 60 * 104 * FP32}


def engine(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert ENGINE, "the engine console script is not on PATH (pip install -e .)"
    return subprocess.run([ENGINE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1, one `error:` message on stderr naming what is wrong, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


# -- validate -----------------------------------------------------------------------------------------------


def test_validate_valid_graph() -> None:
    result = engine("validate", "graphs/wan_i2v.yaml")
    assert result.returncode == 0, result.stderr
    assert "graphs/wan_i2v.yaml: valid (wan i2v, 3 node(s), 2 edge(s), 1 request(s))" in result.stdout
    assert result.stderr == ""


def test_validate_invalid_graph_names_file_line_and_field() -> None:
    result = engine("validate", "tests/unit/invalid_graphs/devices_malformed.yaml")
    assert_user_error(
        result,
        "3 problems in the graph:",
        "tests/unit/invalid_graphs/devices_malformed.yaml:10 nodes.encoder.place.device: got 'gpu:0'",
        "tests/unit/invalid_graphs/devices_malformed.yaml:13 nodes.transformer.place.device: got 'cuda'",
        "tests/unit/invalid_graphs/devices_malformed.yaml:16 nodes.decoder.place.device: got 'cuda:x'",
    )


@pytest.mark.parametrize("name", ["yaml_syntax_error", "yaml_bad_tag_value", "empty_file", "image_file_missing",
                                  "stage_order_cycle_two_nodes"])
def test_validate_never_shows_a_traceback(name: str) -> None:
    path = f"tests/unit/invalid_graphs/{name}.yaml"
    assert_user_error(engine("validate", path), path)


def test_validate_missing_file() -> None:
    assert_user_error(engine("validate", "graphs/no_such_graph.yaml"), "graphs/no_such_graph.yaml: no such graph file")


@pytest.mark.parametrize("text, message", [
    ("name: x\n" + "# padding\n" * 2_300_000, "the file is 21.9 MiB (23000008 bytes); a graph file is at most 1.0 MiB"),
    ("[" * 20_000 + "]" * 20_000, ":1: the document is nested deeper than 64 levels"),
], ids=["22_mib", "20000_nested_lists"])
def test_validate_refuses_huge_and_deep_graphs_within_a_second(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(text)
    start = time.perf_counter()
    result = engine("validate", str(path))
    elapsed = time.perf_counter() - start
    assert_user_error(result, f"{path}{message}" if message.startswith(":") else f"{path}: {message}")
    assert elapsed < 5, f"refused after {elapsed:.1f} s"


# -- --set ----------------------------------------------------------------------------------------------------


def test_set_valid_override() -> None:
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "nodes.transformer.replicas=2",
                    "--set", "nodes.encoder.place.device=cuda:1", "--set", "requests.0.height=64")
    assert result.returncode == 0, result.stderr


def test_set_value_that_breaks_validation_points_at_the_option() -> None:
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "nodes.encoder.place.device=gpu:0")
    assert_user_error(result, "graphs/wan_t2v.yaml (--set nodes.encoder.place.device=gpu:0) "
                              "nodes.encoder.place.device: got 'gpu:0'; expected cpu, cuda:N or xpu:N")
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "requests.0.num_frames=12")
    assert_user_error(result, "graphs/wan_t2v.yaml (--set requests.0.num_frames=12) requests[0].num_frames: "
                              "num_frames must be 4k+1 (e.g. 9 or 13), got 12")


def test_set_unknown_key_path() -> None:
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "nodes.transformer.replica=2")
    assert_user_error(result, "(--set nodes.transformer.replica=2) nodes.transformer.replica: unknown key; "
                              "did you mean 'replicas'?")
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "name.first=x")
    assert_user_error(result, "--set name.first=x: name is not a mapping or list that can hold name.first")
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "edges.7.name=x")
    assert_user_error(result, "--set edges.7.name=x: edges.7 is not a mapping or list")
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "replicas")
    assert_user_error(result, "expected dotted.key=value")


def test_set_of_a_new_nested_key_is_blamed_on_the_option_with_the_valid_keys() -> None:
    result = engine("validate", "graphs/wan_t2v.yaml", "--set", "a.b.c.d=1")
    assert_user_error(result, "1 problem in the graph:\n  graphs/wan_t2v.yaml (--set a.b.c.d=1) a: unknown key (valid: name, "
                              "model, broker, nodes, edges, request, requests, limits, timeouts, scaling)")
    assert "wan_t2v.yaml:" not in result.stderr  # no line of the file is blamed


def test_set_on_every_command() -> None:
    for command in ("validate", "graph", "plan"):
        result = engine(command, "graphs/wan_t2v.yaml", "--set", "model.family=wna")
        assert_user_error(result, "model.family: unknown family 'wna'; did you mean 'wan'?")


# -- help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"]], ids=["engine", "validate"])
def test_help_is_fast(args: list[str]) -> None:
    start = time.perf_counter()
    result = engine(*args)
    elapsed = time.perf_counter() - start
    print(f"engine {' '.join(args)}: {elapsed:.3f} s")
    assert result.returncode == 0
    assert "usage: engine" in result.stdout
    assert elapsed < 3.0, f"engine {' '.join(args)} took {elapsed:.2f} s"


def test_validate_does_not_import_torch() -> None:
    """What keeps validate fast: the declarations and the checks never import torch or diffusers."""
    code = ("import sys; from engine.cli import main; rc = main(['validate', 'graphs/qwen_image_edit.yaml']); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print('heavy:', heavy); sys.exit(rc)")
    result = subprocess.run([shutil.which("python") or "python", "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


# -- graph ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["svg", "dot"])
def test_graph_draws_and_prints_edges(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"wan_i2v.{suffix}"
    result = engine("graph", "graphs/wan_i2v.yaml", *I2V_14B[:10], "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Traceback" not in result.stderr
    assert f"drawn to {out}" in text
    picture = out.read_text()
    if suffix == "svg":
        assert picture.lstrip().startswith(("<?xml", "<svg")) and "</svg>" in picture
        assert "phase1" in picture and "encoder" in picture
    else:
        assert picture.startswith('digraph "wan_i2v" {')
        assert '"encoder" -> "transformer"' in picture and '"transformer" -> "decoder"' in picture
    # every edge with its tensors, shapes and exact bytes
    assert re.search(r"edge phase1: encoder -> transformer over mooncake .*slot 14288128 bytes", text)
    assert re.search(r"edge phase2: transformer -> decoder over mooncake .*slot 8386560 bytes", text)
    for name, shape, nbytes in [("prompt_embeds", "1x512x4096", 4194304), ("image_embeds", "1x257x1280", 657920),
                                ("condition", "1x20x21x60x104", 5241600), ("latents", "1x16x21x60x104", 8386560)]:
        assert re.search(rf"^{name}\s.*\s{shape}\s+{nbytes}\s", text, re.MULTILINE), f"{name} row in:\n{text}"


def test_graph_picture_with_an_unknown_suffix_is_a_user_error(tmp_path: Path) -> None:
    result = engine("graph", "graphs/wan_t2v.yaml", "--set", "model.path=configs/wan2.1-t2v-1.3b",
                    "--out", str(tmp_path / "x.gif"))
    assert_user_error(result, "the picture must end in .png, .svg or .dot")


def test_graph_picture_into_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    for name in ("x.dot", "x.svg"):
        result = engine("graph", "graphs/wan_t2v.yaml", "--set", "model.path=configs/wan2.1-t2v-1.3b",
                        "--out", str(tmp_path / "no" / "such" / name))
        assert_user_error(result, str(tmp_path / "no" / "such"))


# -- plan -----------------------------------------------------------------------------------------------------


@cache
def plan_output() -> str:
    result = engine("plan", "graphs/wan_i2v.yaml", *I2V_14B)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def node_total(text: str, node: str) -> tuple[float, float, float]:
    """(parameters in billions, resident GB, GB were every parameter in bf16) of the node's ``total`` row."""
    match = re.search(rf"^{node}\s+total\s+([\d.]+) B\s+.*\(([\d.]+) GB resident; ([\d.]+) GB in bfloat16", text, re.MULTILINE)
    assert match, f"no total row for {node} in:\n{text}"
    return float(match[1]), float(match[2]), float(match[3])


def test_plan_wan_i2v_14b_node_weights() -> None:
    text = plan_output()
    print(text)
    encoder_params, encoder_resident, encoder_gb = node_total(text, "encoder")
    transformer_params, transformer_resident, transformer_gb = node_total(text, "transformer")
    # What the node really holds: CLIP and the VAE half stay in float32, as in the diffusers reference pipeline.
    assert encoder_resident == pytest.approx(12.8 + (0.63 + 0.054) * 2, rel=TOLERANCE)
    assert "image_encoder, vae_encoder kept in float32" in text
    assert transformer_resident == pytest.approx(transformer_gb, rel=0.01)
    # umT5-XXL encoder 5.68B + CLIP ViT-H/14 vision tower 0.63B + VAE encoder half 0.05B; the DiT 16.4B
    assert encoder_params == pytest.approx(5.68 + 0.63 + 0.05, rel=TOLERANCE)
    assert transformer_params == pytest.approx(16.4, rel=TOLERANCE)
    rows = "\n".join(line for line in text.splitlines() if line.startswith(("encoder ", "transformer ")))
    assert encoder_gb == pytest.approx(12.8, rel=TOLERANCE), (
        f"encoder node in bf16 should hold about 12.8 GB (issue 2, Must show); a component the family runs in "
        f"float32 counts 4 bytes a parameter:\n{rows}")
    assert transformer_gb == pytest.approx(32.8, rel=TOLERANCE), f"transformer node should hold about 32.8 GB:\n{rows}"


def test_plan_wan_i2v_14b_edge_slots() -> None:
    text = plan_output()
    phase1 = sum(align(n) for n in PHASE1.values())
    phase2 = sum(align(n) for n in PHASE2.values())
    for edge, slot in (("phase1", phase1), ("phase2", phase2)):
        match = re.search(rf"^{edge}\s+\S+ -> \S+\s+\S+\s+(\d+) \(.*\)\s+(\d+)\s", text, re.MULTILINE)
        assert match, f"no {edge} row in:\n{text}"
        assert int(match[1]) == slot and int(match[2]) == EdgeSpec.model_fields["slots"].default  # not set in the graph
    assert "fits" in text and re.search(r"^local\s+cpu\s+encoder, transformer, decoder\s.*80\.00 GiB\s+yes$", text,
                                        re.MULTILINE)


def test_plan_edges_in_process_match_the_shapes() -> None:
    """The same plan built in-process: each tensor's exact bytes, each slot aligned per tensor."""
    plan, _, _ = plan_graph(ROOT / "graphs" / "wan_i2v.yaml", I2V_14B[1::2])
    edges = {edge.name: edge for edge in plan.edges}
    for name, expected in (("phase1", PHASE1), ("phase2", PHASE2)):
        edge = edges[name]
        assert {t.name: t.nbytes for t in edge.tensors} == expected
        assert edge.slot_bytes == sum(align(n) for n in expected.values())
        assert edge.slot_bytes % PAYLOAD_ALIGNMENT == 0
    assert edges["phase1"].slot_bytes == 14288128 and edges["phase2"].slot_bytes == 8386560


# -- run: what is refused before any process starts -------------------------------------------------------------

#: A model folder with configs only: planning needs no weights and builds no preset.
T2V_CONFIGS = ["--set", "model.path=configs/wan2.1-t2v-1.3b"]


@pytest.mark.parametrize("out, why", [
    ("/proc/x", "cannot create it (No such file or directory)"),
    ("{tmp}/file", "it is a file, not a folder"),
    ("/dev/null/x", "/dev/null is not a folder"),
], ids=["in_proc", "a_file", "under_dev_null"])
def test_run_refuses_an_output_folder_it_cannot_use(tmp_path: Path, out: str, why: str) -> None:
    (tmp_path / "file").write_text("x")
    out = out.format(tmp=tmp_path)
    result = engine("run", "graphs/wan_t2v.yaml", *T2V_CONFIGS, "--out", out, "--quiet")
    assert_user_error(result, f"error: output folder {out}: {why}; choose another with --out")
    assert result.stdout == ""  # nothing ran


def test_plan_graph_and_run_refuse_a_device_this_host_does_not_have() -> None:
    device = ["--set", "nodes.transformer.place.device=cuda:99"]
    for command in ("plan", "graph", "run"):
        result = engine(command, "graphs/wan_t2v.yaml", *T2V_CONFIGS, *device)
        assert_user_error(result, "the graph places nodes on devices this host does not have:",
                          "(--set nodes.transformer.place.device=cuda:99) node 'transformer' place.device cuda:99: "
                          "this host has ", " CUDA device", "(valid here: cpu")
    assert engine("validate", "graphs/wan_t2v.yaml", *device).returncode == 0  # validate does not look at the host


def test_run_help_lists_every_request_field_with_its_description() -> None:
    result = engine("run", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the help
    for option, description in [
        ("--guidance-scale NUMBER", "wan: Classifier-free guidance scale; <= 1 turns it off."),
        ("--true-cfg-scale NUMBER", "qwen_image: True classifier-free guidance scale"),
        ("--num-frames INT", "wan: Number of frames, 4k+1"), ("--flow-shift NUMBER", "wan: Scheduler flow shift"),
        ("--fps INT", "wan: Frame rate of the written video."), ("--seed INT", "Seed of the initial noise."),
        ("--image FILE", "qwen_image edit: Path of the image to edit"),
    ]:
        assert f"{option} {description}" in text, f"{option} {description!r} not in:\n{result.stdout}"
    assert "each size parameter (e.g. height, width, num_frames) at the graph's `limits` where it sets one, a ceiling" in text


def test_run_refuses_a_request_field_the_graph_model_does_not_have() -> None:
    result = engine("run", "graphs/qwen_image_t2i.yaml", "--guidance-scale", "3")
    assert_user_error(result, "error: --guidance-scale: not an option of qwen_image t2i requests "
                              "(graphs/qwen_image_t2i.yaml); valid: --seed, --cache, --preview-every, --prompt, --negative-prompt, --height, "
                              "--width, --steps, --true-cfg-scale")


def test_run_reports_every_value_over_explicit_limits_at_once() -> None:
    limits = ["--set", "limits.height=48", "--set", "limits.width=64", "--set", "limits.num_frames=9"]
    result = engine("run", "graphs/wan_t2v.yaml", *T2V_CONFIGS, *limits, "--height", "96", "--num-frames", "17")
    assert_user_error(result, "error: 2 values over the limits graphs/wan_t2v.yaml sets on its edge buffers:\n"
                              "  request 1: height=96 exceeds limits.height = 48\n"
                              "  request 1: num_frames=17 exceeds limits.num_frames = 9\n"
                              "raise them in the graph, or with --set limits.height=96 --set limits.num_frames=17")


def test_output_into_a_closed_pipe_is_not_a_traceback() -> None:
    """`engine graph ... | head`: the reader may be gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([ENGINE, "validate", "graphs/wan_t2v.yaml"], cwd=ROOT, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
