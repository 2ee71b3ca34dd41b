"""Qwen-Image through `engine run`: real processes, broker and Mooncake; images equal the monolithic diffusers
pipelines'; prompt embeddings cross phase1 with exactly their bytes, whatever the prompt's length."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.integration.engine_run import GRAPHS, engine_run, live_workers, qwen_pipeline, qwen_reference_image

pytestmark = pytest.mark.integration

SHORT = "a fox"
LONG = " ".join(["a lighthouse on a cliff at dusk, waves below, gulls circling, watercolor"] * 6)


def prompt_tokens(prompt: str) -> int:
    """Tokens the T2I text encoder keeps for a prompt: the templated prompt less the template prefix, at most 512."""
    pipe = qwen_pipeline("t2i")
    tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids)
    return min(tokens - pipe.prompt_template_encode_start_idx, 512)


def graph_with_requests(tmp_path, graph: str, requests: list[dict]) -> str:
    document = yaml.safe_load((GRAPHS / graph).read_text())
    document["requests"] = requests
    for request in requests:
        if "image" in request:
            request["image"] = str(GRAPHS / request["image"])
    path = tmp_path / graph
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.mark.parametrize("graph", ["qwen_image_t2i.yaml", "qwen_image_t2i_single.yaml"])
def test_t2i_matches_the_pipeline_and_sends_exact_prompt_bytes(graph, tmp_path):
    path = graph_with_requests(tmp_path, graph, [{"prompt": SHORT, "seed": 1}, {"prompt": LONG, "seed": 2}])
    run = engine_run(path, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.report
    assert [r["state"] for r in report["requests"]] == ["done", "done"]
    for request in report["requests"]:
        params = json.loads((run.out / f"{request['id']}.json").read_text())["request"]
        image = np.load(run.out / f"{request['id']}.npy")
        expected = qwen_reference_image("t2i", params)
        assert image.shape == expected.shape and np.array_equal(image, expected)
    assert live_workers(run.out) == []
    if graph.endswith("_single.yaml"):
        assert all(r["edges"] == {} for r in report["requests"])
        return

    text_dim = qwen_pipeline("t2i").text_encoder.config.text_config.hidden_size
    negative = prompt_tokens(report["requests"][0]["params"]["negative_prompt"])
    sent = []
    for request, prompt in zip(report["requests"], (SHORT, LONG)):
        phase1 = request["edges"]["phase1"]
        expected = sum(tokens * (text_dim * 4 + 8) for tokens in (prompt_tokens(prompt), negative))  # fp32 embeds + int64 mask
        assert phase1["tensor_bytes"] == expected
        assert 0 <= phase1["nbytes"] - expected < 4 * 64  # only the four tensors' 64-byte alignment gaps
        sent.append(phase1["tensor_bytes"])
    slot = next(e["slot_bytes"] for e in report["edges"] if e["name"] == "phase1")
    assert sent[0] < sent[1] < slot  # never the whole buffer: exactly the prompt's bytes


def test_edit_matches_the_pipeline(tmp_path):
    path = graph_with_requests(tmp_path, "qwen_image_edit.yaml",
                               [{"prompt": "make the sky stormy", "image": "assets/first_frame.png", "seed": 3}])
    run = engine_run(path, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    params = json.loads((run.out / "r1.json").read_text())["request"]
    assert np.array_equal(np.load(run.out / "r1.npy"), qwen_reference_image("edit", params))
    assert (run.out / "r1.png").stat().st_size > 0 and live_workers(run.out) == []
