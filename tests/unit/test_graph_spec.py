"""Units of the graph spec and plan that the corpus and the CLI do not pin down on their own: line numbers,
``--set`` overrides, sizes and the sizing request, device fit."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from engine.errors import PlanError, Problem, SpecError
from engine.plan.build import sizing_request
from engine.plan.check import check_graph
from engine.plan.memory import DeviceFit, MemoryReport
from engine.plan.model import align
from engine.spec.load import apply_override, did_you_mean, load_graph
from engine.spec.schema import parse_memory
from engine.spec.yaml_source import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, LineMap, dotted, parse_yaml

ROOT = Path(__file__).resolve().parents[2]

DOC = """\
# a comment
name: g
nodes:
  encoder:
    stages: [text_encode, image_encode]
    place:
      device: cpu
edges:
  - {name: phase1, from: encoder, to: transformer}
  - name: phase2
    from: transformer
"""


def test_line_map_has_every_key_and_item() -> None:
    data, lines = parse_yaml(DOC, "g.yaml")
    assert data["nodes"]["encoder"]["stages"] == ["text_encode", "image_encode"]
    assert lines.line(()) == 2
    assert lines.line(("name",)) == 2
    assert lines.line(("nodes", "encoder")) == 4
    assert lines.line(("nodes", "encoder", "stages", 1)) == 5
    assert lines.line(("nodes", "encoder", "place", "device")) == 7
    assert lines.line(("edges", 1)) == 10
    assert lines.line(("edges", 1, "from")) == 11
    # a missing key: its nearest ancestor's line
    assert lines.line(("edges", 1, "to")) == 10
    assert lines.line(("nodes", "decoder", "place")) == 3


def test_dotted_paths() -> None:
    assert dotted(("nodes", "encoder", "place", "device")) == "nodes.encoder.place.device"
    assert dotted(("edges", 1, "from")) == "edges[1].from"
    assert dotted(("requests", 0)) == "requests[0]"
    assert dotted(()) == ""


def test_duplicate_keys_are_all_reported() -> None:
    with pytest.raises(SpecError) as caught:
        parse_yaml("a: 1\nb: 2\na: 3\nc:\n  d: 1\n  d: 2\n", "d.yaml")
    assert [(p.line, p.field) for p in caught.value.problems] == [(3, "a"), (6, "c.d")]
    assert "first given on line 1" in caught.value.problems[0].message


def test_non_text_keys_are_reported() -> None:
    with pytest.raises(SpecError) as caught:
        parse_yaml("nodes:\n  1: x\n  ? [a]\n  : y\n", "k.yaml")
    assert [(p.line, p.field) for p in caught.value.problems] == [(2, "nodes"), (3, "nodes")]


def test_problem_text() -> None:
    assert str(Problem("g.yaml", 4, "nodes.a", "bad")) == "g.yaml:4 nodes.a: bad"
    assert str(Problem("g.yaml", None, "", "empty")) == "g.yaml: empty"
    error = SpecError([Problem("g.yaml", 9, "b", "two"), Problem("g.yaml", 2, "a", "one")])
    assert str(error).splitlines() == ["2 problems in the graph:", "  g.yaml:2 a: one", "  g.yaml:9 b: two"]


# -- --set ----------------------------------------------------------------------------------------------------


def overridden(*assignments: str) -> tuple[dict, LineMap]:
    data, lines = parse_yaml(DOC, "g.yaml")
    for assignment in assignments:
        apply_override(data, lines, assignment)
    return data, lines


def test_override_values_are_yaml_scalars_and_flow_collections() -> None:
    data, lines = overridden("nodes.encoder.place.device=cuda:1", "nodes.encoder.replicas=2",
                             "nodes.encoder.stages=[denoise]", "edges.1.to=decoder", "request.prompt=a b=c",
                             "request.negative_prompt=")
    assert data["nodes"]["encoder"]["place"]["device"] == "cuda:1"
    assert data["nodes"]["encoder"]["replicas"] == 2
    assert data["nodes"]["encoder"]["stages"] == ["denoise"]
    assert data["edges"][1]["to"] == "decoder"
    assert data["request"] == {"prompt": "a b=c", "negative_prompt": ""}
    assert lines.overrides[("nodes", "encoder", "replicas")] == "--set nodes.encoder.replicas=2"


def test_override_appends_to_a_list_but_does_not_skip_items() -> None:
    data, _ = overridden("edges.2={name: phase3, from: a, to: b}")
    assert data["edges"][2]["name"] == "phase3"
    data, _ = overridden("nodes.encoder.stages.2=denoise")
    assert data["nodes"]["encoder"]["stages"] == ["text_encode", "image_encode", "denoise"]
    with pytest.raises(SpecError, match=r"nodes.encoder.stages is a list of 2: give an index from 0 to 2 \(the last "
                                         r"appends\), got '5'"):
        overridden("nodes.encoder.stages.5=denoise")


@pytest.mark.parametrize("assignment, message", [
    ("replicas", "expected dotted.key=value"),
    ("=3", "expected dotted.key=value"),
    ("name.x=1", "name is not a mapping or list that can hold name.x"),
    ("edges.9.name=x", "edges.9 is not a mapping or list"),
    ("nodes.encoder.stages.x.y=1", "nodes.encoder.stages.x is not a mapping or list"),
    ("edges.first=x", "edges is a list of 2: give an index from 0 to 2"),
    ("request.prompt=[", "cannot parse the value"),
])
def test_bad_overrides(assignment: str, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", "\\[")) as caught:
        overridden(assignment)
    assert caught.value.problems[0].field == f"--set {assignment}"


def test_problems_under_an_override_name_the_option() -> None:
    _, lines = overridden("nodes.encoder.place.device=gpu")
    problem = lines.problem(("nodes", "encoder", "place", "device"), "bad")
    assert (problem.file, problem.line) == ("g.yaml (--set nodes.encoder.place.device=gpu)", None)
    # a problem with the whole node keeps the file's line and names the option that changed it
    problem = lines.problem(("nodes", "encoder"), "bad")
    assert (problem.line, problem.message) == (4, "bad (after --set nodes.encoder.place.device=gpu)")
    # elsewhere, nothing changes
    assert lines.problem(("edges", 0), "bad") == Problem("g.yaml", 9, "edges[0]", "bad")


@pytest.mark.parametrize("assignment, field, valid", [
    ("a.b.c.d=1", "a", "(valid: name, model, broker, nodes, edges, request, requests, limits, timeouts, scaling)"),
    ("model.foo.bar=1", "model.foo", "(valid: family, task, path, dtype)"),
    ("nodes.encoder.place.gpu.index=1", "nodes.encoder.place.gpu", "(valid: host, device, devices, memory, rdma_device, threads)"),
])
def test_an_override_that_creates_an_unknown_key_is_blamed_on_the_option(assignment: str, field: str, valid: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_graph(ROOT / "graphs" / "wan_t2v.yaml", [assignment])
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.field) == (f"{ROOT / 'graphs' / 'wan_t2v.yaml'} (--set {assignment})", None, field)
    assert problem.message.startswith("unknown key") and problem.message.endswith(valid)


def test_a_part_created_by_an_override_names_the_option_in_every_problem_under_it() -> None:
    _, lines = overridden("nodes.codec.stages=[vae_decode]")
    assert lines.overrides[("nodes", "codec")] == "--set nodes.codec.stages=[vae_decode]"
    problem = lines.problem(("nodes", "codec", "place"), "required but missing")
    assert (problem.file, problem.line) == ("g.yaml (--set nodes.codec.stages=[vae_decode])", None)
    # a part the file already had keeps its line
    assert ("nodes",) not in lines.overrides and lines.problem(("nodes",), "bad").line == 3


def test_overrides_are_applied_before_the_schema() -> None:
    loaded = load_graph(ROOT / "graphs" / "wan_t2v.yaml", ["nodes.transformer.replicas=3", "broker=mqtt://h:1883"])
    assert loaded.spec.nodes["transformer"].replicas == 3
    assert loaded.spec.broker == "mqtt://h:1883"


# -- sizes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("80GiB", 80 * 2**30), ("24GB", 24 * 10**9), ("512 MiB", 512 * 2**20),
                                        ("1.5TiB", int(1.5 * 2**40)), ("100B", 100)])
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["80", "80gb", "80 gigs", "-1GiB", "GiB", "1e3GB", ""])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size such as 80GiB"):
        parse_memory(text)


def test_did_you_mean() -> None:
    assert did_you_mean("denoising", ["text_encode", "denoise"]) == "; did you mean 'denoise'?"
    assert did_you_mean("zzz", ["text_encode", "denoise"]) == ""


def test_align() -> None:
    assert [align(n) for n in (0, 1, 64, 65, 657920)] == [0, 64, 64, 128, 657920]


def test_sizing_request_is_the_largest_admitted() -> None:
    path = ROOT / "graphs" / "wan_t2v.yaml"
    checked = check_graph(load_graph(path, ["requests.1={prompt: b, height: 96, num_frames: 5}"]))
    request = sizing_request(checked)
    assert (request.height, request.width, request.num_frames) == (96, 64, 9)
    checked = check_graph(load_graph(path, ["limits.height=480", "limits.num_frames=81"]))
    request = sizing_request(checked)
    assert (request.height, request.width, request.num_frames) == (480, 64, 81)


def test_device_fit() -> None:
    fits = DeviceFit("local", "cuda:0", capacity=100, required=100, nodes=("a",))
    over = DeviceFit("local", "cuda:1", capacity=2**30, required=2**31, nodes=("b", "c"))
    unknown = DeviceFit("h", "cuda:0", capacity=None, required=1, nodes=("d",))
    assert (fits.fits, over.fits, unknown.fits) == (True, False, None)
    MemoryReport((), (fits, unknown)).raise_if_over()
    with pytest.raises(PlanError, match=r"local cuda:1: nodes b, c need 2.00 GiB, the device has 1.00 GiB"):
        MemoryReport((), (fits, over, unknown)).raise_if_over()


def test_aliases_cannot_expand_a_small_file_into_millions_of_values() -> None:
    doc = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    previous = "a"
    for level in range(8):  # 10**9 values once expanded
        doc += f"b{level}: &b{level} [{', '.join([f'*{previous}'] * 10)}]\n"
        previous = f"b{level}"
    start = time.perf_counter()
    with pytest.raises(SpecError, match="expands to more than 10000 values"):
        parse_yaml(doc, "bomb.yaml")
    assert time.perf_counter() - start < 10
    # an alias used as intended still works
    data, _ = parse_yaml("p: &p {device: cpu}\nq: *p\n", "ok.yaml")
    assert data["q"] == {"device": "cpu"}


# -- size and depth bounds ------------------------------------------------------------------------------------


def refused_quickly(path: Path, message: str) -> SpecError:
    start = time.perf_counter()
    with pytest.raises(SpecError, match=re.escape(message)) as caught:
        load_graph(path)
    assert time.perf_counter() - start < 5
    return caught.value


def test_a_graph_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 2_300_000)  # 22 MiB
    error = refused_quickly(path, f"the file is 21.9 MiB ({path.stat().st_size} bytes); a graph file is at most "
                                  f"1.0 MiB ({MAX_FILE_BYTES} bytes)")
    assert error.problems[0].file == str(path)
    # exactly at the limit the file is read (and judged on its content)
    path.write_text("a: '" + "x" * (MAX_FILE_BYTES - 6) + "'\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    refused_quickly(path, "a: unknown key")


def test_a_graph_from_a_pipe_is_cut_at_the_size_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "graph.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: _write_ignoring_close(fifo, b"#" * (3 * MAX_FILE_BYTES)))
    writer.start()
    refused_quickly(fifo, f"the file is longer than {MAX_FILE_BYTES} bytes")
    writer.join(timeout=5)


def _write_ignoring_close(path: Path, data: bytes) -> None:
    try:
        with path.open("wb") as stream:
            stream.write(data)
    except BrokenPipeError:  # the reader stops at the limit
        pass


@pytest.mark.parametrize("text", [
    "[" * 20_000 + "]" * 20_000,  # flow lists: a RecursionError in PyYAML's composer without the bound
    "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v\n",  # block mappings
    "- " * 5_000 + "x\n",  # block lists
], ids=["flow_lists", "block_mappings", "block_lists"])
def test_deep_nesting_is_refused_within_a_second(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    error = refused_quickly(path, f"the document is nested deeper than {MAX_DEPTH} levels; a graph nests about 5")
    assert error.problems[0].line is not None


def test_nesting_up_to_the_limit_is_read() -> None:
    def nested(lists: int) -> str:  # the mapping is the first level
        return "a: " + "[" * lists + "]" * lists + "\n"

    data, _ = parse_yaml(nested(MAX_DEPTH - 1), "ok.yaml")
    depth, value = 2, data["a"]
    while value:
        depth, value = depth + 1, value[0]
    assert depth == MAX_DEPTH
    with pytest.raises(SpecError, match="nested deeper than"):
        parse_yaml(nested(MAX_DEPTH), "deep.yaml")


def test_a_long_file_under_the_size_limit_is_refused_by_its_node_count(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(("a: [" + ", ".join(["1"] * 500_000))[: MAX_FILE_BYTES - 2] + "]\n")
    refused_quickly(path, f"the document holds more than {MAX_VALUES} keys and values; a graph needs a few hundred")
