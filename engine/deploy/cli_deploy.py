"""``engine deploy k8s``: arguments, and writing the rendered manifests into the output folder."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from engine.deploy import DeployError

if TYPE_CHECKING:
    from engine.deploy.k8s import ClusterOptions
    from engine.deploy.planning import ClusterPlan

DESCRIPTION = """\
Render GRAPH as Kubernetes manifests in --out, to apply with `kubectl apply -k OUT`:
  - a mosquitto broker (Deployment, Service; password file and ACL in a Secret, a user per pod);
  - one Deployment per node, whose pod runs `engine agent`; the rendered graph places the node on that agent.
    All replicas of a node are worker processes in its one pod, sharing its device (the controller places a
    node's replicas on one agent);
  - the serving head: `engine serve` Deployment and Service (port 8000, /health), with no accelerator: the
    outputs come back to it over the data plane and uploads leave from it;
  - Secrets: the deployment key, the API token (ENGINE_API_TOKEN) and the broker passwords, made now;
  - the model volume (mounted read-only at /models) and the head's state volume; kustomization.yaml.
Resources come from the plan, as `engine plan` prints it: a pod requests the weights and receive buffers of
all its replicas as memory, plus --headroom per process; one accelerator per device its nodes use
(nvidia.com/gpu, gpu.intel.com/i915); an RDMA device (--rdma-resource) where an edge says protocol: rdma.
The model's configs are read here from the graph's model.path (give real configs, e.g. --set
model.path=configs/wan2.1-i2v-14b-480p --set model.dtype=bf16); the pods load the model from --model-path.
Secrets are written only into OUT/secrets.yaml (mode 0600); rendering again makes new ones."""

EPILOG = """\
examples:
  engine deploy k8s graphs/wan_i2v.yaml --image registry.example.com/engine:0.1.0 \\
      --set model.path=configs/wan2.1-i2v-14b-480p --set model.dtype=bf16 \\
      --set nodes.encoder.place.device=cuda:0 --set nodes.transformer.place.device=cuda:0 \\
      --set nodes.decoder.place.device=cuda:0 --set limits.height=480 --set limits.width=832 \\
      --set limits.num_frames=81 --model-path /models/Wan2.1-I2V-14B-480P-Diffusers --storage-class nfs
  kubectl apply -k k8s-wan-i2v
  kubectl -n wan-i2v get secret engine-keys -o jsonpath='{.data.api-token}' | base64 -d   # the API token
Anything without a flag (CPU requests, memory limits, one pod's node selector, the image pull policy) is a
kustomize patch: see the README's "On Kubernetes"."""


def add_deploy_parsers(commands: argparse._SubParsersAction,
                       add_graph_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    deploy = commands.add_parser("deploy", help="render a graph for a cluster (Kubernetes manifests)",
                                 description="Render a graph for a cluster. Targets: k8s.")
    targets = deploy.add_subparsers(dest="target", required=True, metavar="TARGET")
    k8s = targets.add_parser("k8s", help="Kubernetes manifests and a kustomization, for `kubectl apply -k`",
                             description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_arguments(k8s)
    k8s.add_argument("--image", help="the engine's container image, built from the Dockerfile (required)")
    k8s.add_argument("--namespace", help="namespace of everything rendered (default: the graph's name, _ as -)")
    k8s.add_argument("--out", type=Path, help="folder to write (default: k8s-<namespace>); files there of the same "
                                               "names are replaced")
    k8s.add_argument("--model-path", help="the model's diffusers-layout folder as pods see it, under /models "
                                          "(default: /models/<last part of the graph's model.path>)")
    k8s.add_argument("--model-claim", help="an existing PersistentVolumeClaim holding the models (default: render "
                                           "a ReadWriteMany claim 'models' of --model-size to fill yourself)")
    k8s.add_argument("--model-size", default="200Gi", help="size of the rendered model claim (default: 200Gi)")
    k8s.add_argument("--state-size", default="64Gi",
                     help="size of the serving head's state claim: jobs, uploads and outputs; keep it above what "
                          "`engine serve` retains (--retain-bytes, default 50GiB) (default: 64Gi)")
    k8s.add_argument("--storage-class", help="storage class of the rendered claims (default: the cluster's default)")
    k8s.add_argument("--headroom", default="2GiB", metavar="SIZE",
                     help="memory requested per process on top of the plan's weights and buffers: Python, torch, "
                          "CUDA context, activations (default: 2GiB)")
    k8s.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                     help="schedule the engine's pods only on nodes with this label (repeatable)")
    k8s.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                     help="let the engine's pods run on nodes with this taint, e.g. nvidia.com/gpu:NoSchedule (repeatable)")
    k8s.add_argument("--broker-image", default="eclipse-mosquitto:2.0",
                     help="the broker's image (default: eclipse-mosquitto:2.0)")
    k8s.add_argument("--rdma-resource", default="rdma/rdma_shared_device_a",
                     help="the resource a pod with an RDMA edge requests one of (default: rdma/rdma_shared_device_a, "
                          "from the RDMA shared device plugin)")
    k8s.set_defaults(handler=_k8s)


def _k8s(args: argparse.Namespace) -> int:
    from engine.deploy.credentials import HEAD_USER, Credentials
    from engine.deploy.k8s import MODELS_DIR, SECRET_FILES, ClusterOptions, Toleration, broker_url, dns_name, render
    from engine.deploy.planning import plan_for_cluster
    from engine.spec.schema import parse_memory

    if not args.image:
        raise DeployError("--image is required: the engine's container image, e.g. built with "
                          "`docker build -t REGISTRY/engine:TAG .` and pushed where the cluster pulls from")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise DeployError(f"--out {args.out}: a file is there; give a folder")
    try:
        headroom = parse_memory(args.headroom)
    except ValueError as exc:
        raise DeployError(f"--headroom: {exc}") from None
    selector = {}
    for given in args.node_selector:
        key, sep, value = given.partition("=")
        if not sep or not key:
            raise DeployError(f"--node-selector {given!r}: expected KEY=VALUE, e.g. nvidia.com/gpu.present=true")
        selector[key] = value
    if args.model_path is not None and not PurePosixPath(args.model_path).is_relative_to(MODELS_DIR):
        raise DeployError(f"--model-path {args.model_path!r}: pods see models under {MODELS_DIR}; give a folder there")
    tolerations = tuple(Toleration.parse(text) for text in args.toleration)
    cluster = plan_for_cluster(args.graph, args.overrides, broker=broker_url(HEAD_USER), models_dir=MODELS_DIR,
                               model_path=args.model_path, headroom_bytes=headroom)
    options = ClusterOptions(
        image=args.image, namespace=args.namespace or dns_name(cluster.plan.graph), storage_class=args.storage_class,
        model_claim=args.model_claim, model_size=args.model_size, state_size=args.state_size,
        node_selector=selector, tolerations=tolerations, broker_image=args.broker_image, rdma_resource=args.rdma_resource)
    credentials = Credentials.generate(cluster.pods, {n.name: n.most_replicas for n in cluster.plan.nodes.values()})
    out = args.out or Path(f"k8s-{options.namespace}")
    write_files(out, render(cluster, options, credentials), secret_files=SECRET_FILES)
    _summary(cluster, options, out)
    return 0


def write_files(out: Path, files: dict[str, list[dict[str, Any]]], *, secret_files: tuple[str, ...]) -> None:
    """Each file's manifests as YAML documents; ``secret_files`` readable by their owner only, from creation on."""
    from engine.deploy.k8s import dump

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, manifests in files.items():
            path = out / name
            mode = 0o600 if name in secret_files else 0o644
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            os.fchmod(descriptor, mode)  # a file already there keeps its mode through O_CREAT
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                dump(manifests, file)
    except OSError as exc:
        raise DeployError(f"--out {out}: cannot write {exc.filename}: {exc.strerror}") from None


def _summary(cluster: ClusterPlan, options: ClusterOptions, out: Path) -> None:
    from engine.deploy.k8s import memory_quantity
    from engine.display import table

    nodes = cluster.plan.nodes
    rows = [[pod.name, ", ".join(f"{node} x{nodes[node].replicas} on {', '.join(nodes[node].devices) or nodes[node].device}"
                                 for node in cluster.resources[pod.name].nodes),
             memory_quantity(cluster.resources[pod.name].memory_bytes),
             ", ".join(f"{name}: {count}" for name, count in cluster.resources[pod.name].accelerators.items()) or "-",
             "yes" if cluster.resources[pod.name].rdma else "-"] for pod in cluster.pods]
    print(table(["pod", "nodes", "memory request", "accelerators", "rdma"], rows))
    print(f"\nwritten to {out}/ (secrets in {out}/secrets.yaml, mode 0600); apply with:\n  kubectl apply -k {out}\n"
          f"the API token: kubectl -n {options.namespace} get secret engine-keys -o jsonpath='{{.data.api-token}}' | base64 -d")
