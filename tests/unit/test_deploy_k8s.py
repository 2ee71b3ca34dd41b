"""``engine deploy k8s``: every shipped graph renders to manifests that Kubernetes' own schemas accept (1.30 and
the newest kubernetes-validate ships, strict), the pods' commands parse with the engine's own parser, the rendered
graph puts each node on its pod, and what the pods request is the plan's figures (Wan2.1-I2V-14B in bf16).

Rendering runs in process; no cluster is involved.
"""

from __future__ import annotations

import math
import re
import stat
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine.cli import build_parser, main
from engine.control.broker import BrokerAddress, parse_broker
from engine.families import get_family
from engine.plan.build import build_plan
from engine.plan.check import check_graph
from engine.plan.feeder import DEFAULT_FILE_BYTES
from engine.plan.memory import memory_report
from engine.spec.load import load_graph

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))
KUBERNETES = ("1.30.0", kubernetes_validate.latest_version())
IMAGE = "registry.example.com/engine:0.1.0"
GIB, MIB = 2**30, 2**20
HEADROOM = 2 * GIB  # the --headroom default, per process
I2V_14B = ["--set", "model.path=configs/wan2.1-i2v-14b-480p", "--set", "model.dtype=bf16",
           "--set", "limits.height=480", "--set", "limits.width=832", "--set", "limits.num_frames=81",
           "--set", "nodes.encoder.place.device=cuda:0", "--set", "nodes.transformer.place.device=cuda:1",
           "--set", "nodes.decoder.place.device=cuda:0"]
ENV_REFERENCE = re.compile(r"\$\(([A-Z_][A-Z0-9_]*)\)")


def render(out: Path, graph: Path, *extra: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``engine deploy k8s`` in process; each written file's manifests."""
    assert main(["deploy", "k8s", str(graph), "--image", IMAGE, "--out", str(out), *extra]) == 0
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(out.iterdir())}


def deployments(files: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for manifests in files.values() for m in manifests if m["kind"] == "Deployment"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def expanded_args(deployment: dict[str, Any]) -> list[str]:
    """The container's arguments as Kubernetes hands them to it: each ``$(VAR)`` of its env replaced (by a
    stand-in for a Secret's or the pod's value), and none left that the env does not define."""
    box = container(deployment)
    values = {e["name"]: "10.1.2.3" if "fieldRef" in e.get("valueFrom", {}) else "s3cret" for e in box.get("env", [])}
    args = []
    for arg in box["args"]:
        for name in ENV_REFERENCE.findall(arg):
            assert name in values, f"{deployment['metadata']['name']}: $({name}) is not in the container's env"
        args.append(ENV_REFERENCE.sub(lambda match: values[match.group(1)], arg))
    return args


def rendered_graph(files: dict[str, list[dict[str, Any]]], tmp_path: Path):
    (config_map,) = files["graph.yaml"]
    path = tmp_path / "graph.yaml"
    path.write_text(config_map["data"]["graph.yaml"])
    return check_graph(load_graph(path))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, list[dict[str, Any]]]]]:
    """Every shipped graph rendered once: graph name -> (its output folder, its files)."""
    rendered = {}
    for graph in GRAPHS:
        out = tmp_path_factory.mktemp(graph.stem)
        rendered[graph.stem] = (out, render(out / "k8s", graph))
    return rendered


# -- schemas --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_of_every_shipped_graph_is_valid_kubernetes(shipped, version: str) -> None:
    assert len(shipped) == len(GRAPHS) >= 12
    for graph, (_, files) in shipped.items():
        for name, manifests in files.items():
            if name == "kustomization.yaml":
                continue
            for manifest in manifests:
                try:
                    kubernetes_validate.validate(manifest, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{graph} {name} {manifest['kind']} {manifest['metadata']['name']}: {exc}")


def test_the_kustomization_lists_every_file_and_sets_the_namespace(shipped) -> None:
    for graph, (out, files) in shipped.items():
        (kustomization,) = files["kustomization.yaml"]
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert kustomization["namespace"] == graph.replace("_", "-")
        assert sorted(kustomization["resources"]) == sorted(set(files) - {"kustomization.yaml"})
        assert {m["kind"] for m in files["namespace.yaml"]} == {"Namespace"}


def test_secrets_are_only_in_the_secret_manifests_which_only_their_owner_reads(shipped) -> None:
    for graph, (out, files) in shipped.items():
        (keys, auth) = files["secrets.yaml"]
        secrets = [value for value in keys["stringData"].values()]
        assert len(keys["stringData"]["deploy-key"]) == 64 and int(keys["stringData"]["deploy-key"], 16)
        assert stat.S_IMODE((out / "k8s" / "secrets.yaml").stat().st_mode) == 0o600
        for name, manifests in files.items():
            if name == "secrets.yaml":
                continue
            assert stat.S_IMODE((out / "k8s" / name).stat().st_mode) == 0o644
            text = (out / "k8s" / name).read_text()
            assert not [secret for secret in secrets if secret in text], f"{graph}: a secret in {name}"
        users = [line.split(":", 1)[0] for line in auth["stringData"]["passwd"].splitlines()]
        assert users[0] == "head" and sorted(users[1:]) == sorted(set(deployments(files)) - {"head", "broker"})


def test_rendering_again_makes_new_secrets(tmp_path: Path) -> None:
    first = render(tmp_path / "a", ROOT / "graphs" / "wan_i2v.yaml")["secrets.yaml"][0]["stringData"]
    second = render(tmp_path / "b", ROOT / "graphs" / "wan_i2v.yaml")["secrets.yaml"][0]["stringData"]
    assert first.keys() == second.keys() and not set(first.values()) & set(second.values())


# -- commands and placement -----------------------------------------------------------------------------------------


def test_agent_commands_parse_and_the_graph_places_each_node_on_its_own_pod(shipped, tmp_path: Path) -> None:
    parser = build_parser()
    for graph, (_, files) in shipped.items():
        checked = rendered_graph(files, tmp_path)
        spec = checked.loaded.spec
        agents = {name: d for name, d in deployments(files).items() if name not in ("head", "broker")}
        assert sorted(agents) == sorted(spec.nodes[n].place.host for n in spec.nodes), graph  # none in the head
        assert sorted(agents) == sorted(f"node-{n.replace('_', '-')}" for n in spec.nodes), graph
        assert "limits" not in container(deployments(files)["head"])["resources"], graph  # no accelerator
        for name, deployment in agents.items():
            assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
            assert container(deployment)["command"] == ["engine"]
            args = parser.parse_args(expanded_args(deployment))
            assert args.command == "agent" and args.name == name
            (node,) = [n for n in spec.nodes if spec.nodes[n].place.host == name]
            assert args.devices == [spec.nodes[node].place.device]
            assert args.address == "10.1.2.3" and args.models == [Path("/models")]
            assert spec.model.path.startswith("/models/")
            broker = parse_broker(args.broker)
            assert isinstance(broker, BrokerAddress) and (broker.host, broker.port, broker.username) == ("broker", 1883, name)
            mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
            assert args.key_file.parent.as_posix() in mounts
        assert spec.broker == "mqtt://head@broker:1883" and spec.requests == []


def test_the_serving_head_command_parses(shipped) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    if "serve" not in commands:
        pytest.skip("`engine serve` is not in this tree yet: its command line cannot be checked")
    for graph, (_, files) in shipped.items():
        head = deployments(files)["head"]
        args = parser.parse_args(expanded_args(head))
        assert args.command == "serve" and str(args.graph) == "/etc/engine/graph.yaml"
        assert (args.host, args.port, str(args.state_dir)) == ("0.0.0.0", 8000, "/var/lib/engine")
        assert [parse_broker(o.removeprefix("broker=")).username for o in args.overrides] == ["head"]
        env = {e["name"] for e in container(head)["env"]}
        assert {"ENGINE_API_TOKEN", "ENGINE_DEPLOY_KEY", "ENGINE_MOONCAKE_HOST"} <= env


# -- resources from the plan ----------------------------------------------------------------------------------------


def planned(graph: str, overrides: list[str]):
    """The plan of the graph as the cluster runs it, made here from the plan functions directly."""
    sets = [value for flag, value in zip(overrides[::2], overrides[1::2]) if flag == "--set"]
    checked = check_graph(load_graph(ROOT / "graphs" / graph, sets))
    source = ROOT / "configs" / "wan2.1-i2v-14b-480p"
    plan = build_plan(checked, source, input_file_bytes=DEFAULT_FILE_BYTES)  # a service's uploads
    return plan, {m.node: m for m in memory_report(plan, get_family("wan"), source).nodes}


def requests_of(deployment: dict[str, Any]) -> tuple[int, dict[str, str]]:
    resources = container(deployment)["resources"]
    memory = resources["requests"]["memory"]
    assert memory.endswith("Mi")
    return int(memory.removesuffix("Mi")) * MIB, resources.get("limits", {})


# The head runs the feeder (uploads out) and the collector (outputs back), which the plan adds there.
PODS = {"head": ["feeder", "collector"], "node-encoder": ["encoder"], "node-transformer": ["transformer"],
        "node-decoder": ["decoder"]}


@pytest.mark.parametrize("graph", ["wan_i2v.yaml", "wan_i2v_two_dit.yaml"])
def test_memory_and_gpu_requests_are_the_plans_figures_for_wan_i2v_14b(tmp_path: Path, capsys, graph: str) -> None:
    files = render(tmp_path / "k8s", ROOT / "graphs" / graph, *I2V_14B)
    # Each node on its pod's host, as the cluster places them: the encoder's pod also receives the input image.
    placed = [arg for pod, nodes in PODS.items() if pod != "head" for n in nodes for arg in ("--set", f"nodes.{n}.place.host={pod}")]
    plan, memory = planned(graph, [*I2V_14B, *placed])
    assert sorted(plan.nodes) == sorted(n for nodes in PODS.values() for n in nodes)
    assert plan.edge_between("feeder", "encoder").slot_bytes == DEFAULT_FILE_BYTES
    rows = []
    for pod, nodes in PODS.items():
        processes = 1 + sum(plan.nodes[n].replicas for n in nodes)
        weights = sum(plan.nodes[n].replicas * memory[n].weight_bytes for n in nodes)
        buffers = sum(plan.nodes[n].replicas * e.slots * e.slot_bytes for n in nodes for e in plan.edges_into(n))
        expected = math.ceil((weights + buffers + processes * HEADROOM) / MIB) * MIB
        got, limits = requests_of(deployments(files)[pod])
        assert got == expected, (pod, got, expected)
        assert limits == ({} if pod == "head" else {"nvidia.com/gpu": "1"}), pod
        rows.append(f"{pod}: weights {weights / GIB:.2f} GiB + buffers {buffers / GIB:.2f} GiB + {processes} x 2 GiB "
                    f"headroom = {expected // MIB} Mi, {len(limits)} GPU")
    with capsys.disabled():
        print(f"\n{graph} Wan2.1-I2V-14B bf16 480x832x81:\n  " + "\n  ".join(rows))
    assert plan.nodes["transformer"].replicas == (2 if "two_dit" in graph else 1)


def test_each_pod_sees_its_gpu_as_cuda_0(tmp_path: Path) -> None:
    files = render(tmp_path / "k8s", ROOT / "graphs" / "wan_i2v_shared_codec.yaml",
                   "--set", "nodes.codec.place.device=cuda:3", "--set", "nodes.transformer.place.device=cuda:5")
    assert requests_of(deployments(files)["head"])[1] == {}
    for pod in ("node-codec", "node-transformer"):
        assert requests_of(deployments(files)[pod])[1] == {"nvidia.com/gpu": "1"}
        assert "cuda:0" in expanded_args(deployments(files)[pod])
    spec = rendered_graph(files, tmp_path).loaded.spec
    assert (spec.nodes["codec"].place.device, spec.nodes["transformer"].place.device) == ("cuda:0", "cuda:0")


def test_an_rdma_edge_asks_both_its_pods_for_an_rdma_device(tmp_path: Path) -> None:
    files = render(tmp_path / "k8s", ROOT / "graphs" / "wan_i2v.yaml", "--set", "edges.0.protocol=rdma",
                   "--rdma-resource", "rdma/hca")
    for pod, rdma in (("node-encoder", True), ("node-transformer", True), ("head", False)):
        box = container(deployments(files)[pod])
        assert ("rdma/hca" in box["resources"].get("limits", {})) is rdma, pod
        assert ("IPC_LOCK" in str(box.get("securityContext"))) is rdma, pod


def test_cluster_choices_reach_every_engine_pod(tmp_path: Path) -> None:
    files = render(tmp_path / "k8s", ROOT / "graphs" / "wan_t2v.yaml", "--namespace", "video",
                   "--node-selector", "pool=gpu", "--toleration", "nvidia.com/gpu:NoSchedule", "--toleration",
                   "dedicated=engine:NoExecute", "--storage-class", "fast", "--model-claim", "weights",
                   "--model-path", "/models/wan/t2v")
    assert files["kustomization.yaml"][0]["namespace"] == "video"
    claims = {m["metadata"]["name"]: m for m in files["volumes.yaml"]}
    assert list(claims) == ["head-state"] and claims["head-state"]["spec"]["storageClassName"] == "fast"
    for name, deployment in deployments(files).items():
        if name == "broker":
            continue
        pod = deployment["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "dedicated", "operator": "Equal", "value": "engine", "effect": "NoExecute"}]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert rendered_graph(files, tmp_path).loaded.spec.model.path == "/models/wan/t2v"


# -- errors a user can make -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    (["graphs/wan_i2v.yaml"], "--image is required"),
    (["graphs/no_such_graph.yaml", "--image", IMAGE], "graphs/no_such_graph.yaml: no such graph file"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--out", "README.md"], "--out README.md: a file is there"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--set", "edges.0.transport=shm"], "shm needs both nodes on one host"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--toleration", "gpu"], "--toleration 'gpu': expected KEY[=VALUE]:EFFECT"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--headroom", "lots"], "--headroom: got 'lots'"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--namespace", "My_NS"], "--namespace 'My_NS'"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--model-path", "/data/wan"], "pods see models under /models"),
    (["graphs/wan_i2v.yaml", "--image", IMAGE, "--state-size", "64GiB"], "--state-size '64GiB': expected a Kubernetes quantity"),
])
def test_bad_input_is_one_clear_line(capsys, monkeypatch, argv: list[str], needle: str) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["deploy", "k8s", *argv]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("error: ") and needle in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if lines[0] == "error: 1 problem in the graph:":  # the graph's problems are listed as every command lists them
        lines = [lines[0] + lines[1]]
    assert len(lines) == 1, captured.err
