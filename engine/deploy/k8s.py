"""Kubernetes manifests for a graph planned for a cluster: pure functions from the plan to manifest dicts.

:func:`render` returns every file of the output folder as a list of manifests (``kustomization.yaml`` last):

    namespace.yaml      the namespace
    secrets.yaml        the deployment key, the API token, each pod's broker password, mosquitto's password file and ACL
    volumes.yaml        the model volume (unless --model-claim names one) and the serving head's state volume
    broker.yaml         mosquitto: its configuration, Deployment and Service
    graph.yaml          the graph as the serving head runs it (a ConfigMap)
    head.yaml           the serving head: ``engine serve`` Deployment and Service
    node-<node>.yaml    one Deployment per node of the graph, its pod running ``engine agent``

No secret is in any manifest but the Secrets: pods read them as environment variables or files, and a broker
password reaches a command line only through Kubernetes' ``$(VAR)`` expansion inside the container.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import IO, Any

import yaml

from engine.deploy import DeployError
from engine.deploy.credentials import HEAD_USER, Credentials
from engine.deploy.planning import ClusterPlan
from engine.deploy.pods import HEAD, Pod, PodResources
from engine.plan.model import Plan

APP = "diffusion-graph-engine"
MODELS_DIR = "/models"  #: where pods mount the model volume (read-only)
STATE_DIR = "/var/lib/engine"  #: the serving head's jobs database and outputs
GRAPH_DIR = "/etc/engine"
KEYS_DIR = "/etc/engine-keys"
HTTP_PORT = 8000
MQTT_PORT = 1883
BROKER = "broker"  #: the broker's Deployment and Service
KEYS = "engine-keys"  #: the Secret with the deployment key, the API token and the broker passwords
BROKER_AUTH = "broker-auth"  #: the Secret with mosquitto's password file and ACL
MODELS_CLAIM = "models"
STATE_CLAIM = "head-state"
ENGINE_UID = 10001  #: the user the Dockerfile's image runs as
MOSQUITTO_UID = 1883  #: the eclipse-mosquitto image's user
SECRET_FILES = ("secrets.yaml",)  #: written with mode 0600
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
MOSQUITTO_CONF = f"""\
listener {MQTT_PORT}
allow_anonymous false
password_file /mosquitto/auth/passwd
acl_file /mosquitto/auth/acl
persistence false
max_inflight_messages 0
max_queued_messages 100000
set_tcp_nodelay true
log_dest stdout
log_type error
log_type warning
"""


@dataclass(frozen=True)
class Toleration:
    key: str
    value: str | None
    effect: str

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``KEY[=VALUE]:EFFECT``, as ``kubectl taint`` writes a taint."""
        taint, _, effect = text.rpartition(":")
        key, _, value = taint.partition("=")
        if not key or effect not in _EFFECTS:
            raise DeployError(f"--toleration {text!r}: expected KEY[=VALUE]:EFFECT with EFFECT one of {', '.join(_EFFECTS)}, "
                              "e.g. nvidia.com/gpu:NoSchedule")
        return cls(key, value or None, effect)

    def manifest(self) -> dict[str, str]:
        if self.value is None:
            return {"key": self.key, "operator": "Exists", "effect": self.effect}
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class ClusterOptions:
    """What a user chooses about the cluster (``engine deploy k8s`` flags, which hold the defaults)."""

    image: str
    namespace: str
    storage_class: str | None  #: None: the cluster's default
    model_claim: str | None  #: an existing claim holding the models; None: render one
    model_size: str  #: of the rendered model claim
    state_size: str  #: of the serving head's state claim
    node_selector: dict[str, str]
    tolerations: tuple[Toleration, ...]
    broker_image: str
    rdma_resource: str  #: what a pod with an RDMA edge requests one of

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.namespace):
            raise DeployError(f"--namespace {self.namespace!r}: a namespace is lower-case letters, digits and '-', "
                              "at most 63, starting and ending with a letter or digit")
        for flag, size in (("--model-size", self.model_size), ("--state-size", self.state_size)):
            if not _QUANTITY.match(size):
                raise DeployError(f"{flag} {size!r}: expected a Kubernetes quantity such as 200Gi or 500G")


def dns_name(text: str) -> str:
    """A graph or node name (``[a-z][a-z0-9_]*``) as a Kubernetes name."""
    return text.replace("_", "-")


def broker_url(user: str, password: str | None = None) -> str:
    """The broker as pods reach it; ``password`` a ``$(VAR)`` the container expands."""
    credentials = f"{user}:{password}" if password is not None else user
    return f"mqtt://{credentials}@{BROKER}:{MQTT_PORT}"


def memory_quantity(nbytes: int) -> str:
    """Bytes as a Kubernetes quantity, rounded up to MiB."""
    return f"{math.ceil(nbytes / 2**20)}Mi"


def render(cluster: ClusterPlan, options: ClusterOptions, credentials: Credentials) -> dict[str, list[dict[str, Any]]]:
    """Every file of the output folder and its manifests."""
    instance = dns_name(cluster.plan.graph)
    models = [] if options.model_claim else [_claim(MODELS_CLAIM, "ReadWriteMany", options.model_size, options, instance)]
    files = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": options.namespace}}],
        "secrets.yaml": _secrets(cluster.pods, credentials, instance),
        "volumes.yaml": [*models, _claim(STATE_CLAIM, "ReadWriteOnce", options.state_size, options, instance)],
        "broker.yaml": _broker(options, instance),
        "graph.yaml": [_config_map("graph", {"graph.yaml": _yaml(cluster.graph)}, instance, HEAD)],
    }
    for pod in cluster.pods:
        manifests = [_deployment(pod, cluster, options, instance)]
        if pod.is_head:
            manifests.append(_service(HEAD, HTTP_PORT, "http", instance))
        files[f"{pod.name}.yaml"] = manifests
    files["kustomization.yaml"] = [{
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": options.namespace,
        "resources": list(files)}]
    return files


class ManifestDumper(yaml.SafeDumper):
    """Safe YAML as people write manifests: no anchors for repeated parts, text of several lines as a block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


ManifestDumper.add_representer(str, _text)


def dump(documents: list[dict[str, Any]], stream: IO[str] | None = None) -> str | None:
    """YAML documents for a manifest file (to ``stream``, else returned)."""
    return yaml.dump_all(documents, stream, Dumper=ManifestDumper, sort_keys=False)


def _yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=ManifestDumper, sort_keys=False)


def _metadata(name: str, instance: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": _labels(instance, component)}


def _labels(instance: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}


def _selector(instance: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}


def _config_map(name: str, data: dict[str, str], instance: str, component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, instance, component), "data": data}


def _secrets(pods: tuple[Pod, ...], credentials: Credentials, instance: str) -> list[dict[str, Any]]:
    keys = {"deploy-key": credentials.deploy_key, "api-token": credentials.api_token}
    keys.update({f"broker-password-{pod.name}": credentials.users[pod.name].password for pod in pods})
    auth = {"passwd": credentials.password_file(), "acl": credentials.acl_file()}
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": _metadata(name, instance, component), "type": "Opaque",
             "stringData": data} for name, component, data in ((KEYS, HEAD, keys), (BROKER_AUTH, BROKER, auth))]


def _claim(name: str, access: str, size: str, options: ClusterOptions, instance: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [access], "resources": {"requests": {"storage": size}}}
    if options.storage_class is not None:
        spec["storageClassName"] = options.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _metadata(name, instance, name), "spec": spec}


def _service(name: str, port: int, port_name: str, instance: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(name, instance, name),
            "spec": {"selector": _selector(instance, name),
                     "ports": [{"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}]}}


def _deployment_of(name: str, instance: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    """One pod, replaced by stopping the old one first: two agents of one name, two controllers, or two brokers
    must never run at once."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(name, instance, name),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": _selector(instance, name)},
                     "template": {"metadata": {"labels": _labels(instance, name)}, "spec": pod_spec}}}


def _broker(options: ClusterOptions, instance: str) -> list[dict[str, Any]]:
    probe = {"tcpSocket": {"port": "mqtt"}, "periodSeconds": 10}
    container = {
        "name": "mosquitto", "image": options.broker_image,
        "ports": [{"name": "mqtt", "containerPort": MQTT_PORT, "protocol": "TCP"}],
        "readinessProbe": probe, "livenessProbe": {**probe, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/mosquitto/config", "readOnly": True},
                         {"name": "auth", "mountPath": "/mosquitto/auth", "readOnly": True}],
    }
    pod = {
        "securityContext": {"runAsUser": MOSQUITTO_UID, "runAsGroup": MOSQUITTO_UID, "fsGroup": MOSQUITTO_UID,
                            "runAsNonRoot": True},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{BROKER}-config"}},
                    {"name": "auth", "secret": {"secretName": BROKER_AUTH, "defaultMode": 0o440}}],
    }
    return [_config_map(f"{BROKER}-config", {"mosquitto.conf": MOSQUITTO_CONF}, instance, BROKER),
            _deployment_of(BROKER, instance, pod), _service(BROKER, MQTT_PORT, "mqtt", instance)]


def _deployment(pod: Pod, cluster: ClusterPlan, options: ClusterOptions, instance: str) -> dict[str, Any]:
    """The pod's Deployment: its container (the serving head or an agent), the plan's resources, the model volume
    read-only, a memory-backed /dev/shm, and the cluster's node selector and tolerations."""
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    password = _secret_env("ENGINE_BROKER_PASSWORD", f"broker-password-{pod.name}")
    mounts = [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": options.model_claim or MODELS_CLAIM, "readOnly": True}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if pod.is_head:
        container = _head_container(cluster.plan)
        container["env"] = [password, _secret_env("ENGINE_DEPLOY_KEY", "deploy-key"),
                            _secret_env("ENGINE_API_TOKEN", "api-token"), {"name": "ENGINE_MOONCAKE_HOST", "valueFrom": pod_ip}]
        mounts += [{"name": "graph", "mountPath": GRAPH_DIR, "readOnly": True}, {"name": "state", "mountPath": STATE_DIR}]
        volumes += [{"name": "graph", "configMap": {"name": "graph"}},
                    {"name": "state", "persistentVolumeClaim": {"claimName": STATE_CLAIM}}]
    else:
        container = _agent_container(pod)
        container["env"] = [{"name": "POD_IP", "valueFrom": pod_ip}, password]
        mounts.append({"name": "keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append({"name": "keys", "secret": {"secretName": KEYS, "defaultMode": 0o400,
                                                   "items": [{"key": "deploy-key", "path": "deploy-key"}]}})
    container.update(image=options.image, resources=_resources(cluster.resources[pod.name], options), volumeMounts=mounts)
    if cluster.resources[pod.name].rdma:
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}  # RDMA pins the memory it registers
    spec: dict[str, Any] = {"securityContext": {"fsGroup": ENGINE_UID}, "containers": [container], "volumes": volumes}
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = [toleration.manifest() for toleration in options.tolerations]
    return _deployment_of(pod.name, instance, spec)


def _resources(resources: PodResources, options: ClusterOptions) -> dict[str, Any]:
    """Memory as a request (the plan does not bound activations, so no limit); devices as limits, as Kubernetes
    wants extended resources."""
    limits = {name: str(count) for name, count in resources.accelerators.items()}
    if resources.rdma:
        limits[options.rdma_resource] = "1"
    return {"requests": {"memory": memory_quantity(resources.memory_bytes)}, **({"limits": limits} if limits else {})}


def _secret_env(name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": KEYS, "key": key}}}


def _head_container(plan: Plan) -> dict[str, Any]:
    """``engine serve`` with the rendered graph; /health tells readiness, /health/live liveness (a node down must
    not restart the head). Starting may take as long as the graph lets its replicas load (timeouts.ready_s)."""
    health = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "name": "serve", "command": ["engine"],
        "args": ["serve", f"{GRAPH_DIR}/graph.yaml", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--state-dir", STATE_DIR,
                 "--set", f"broker={broker_url(HEAD_USER, '$(ENGINE_BROKER_PASSWORD)')}"],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "startupProbe": {**health, "failureThreshold": math.ceil(plan.timeouts.ready_s / 10) + 6},
        "readinessProbe": health,
        "livenessProbe": {**health, "httpGet": {"path": "/health/live", "port": "http"}, "failureThreshold": 6},
    }


def _agent_container(pod: Pod) -> dict[str, Any]:
    """``engine agent`` named as the graph places the pod's node; it reaches the broker as its own user, offers the
    pod's devices, loads models only from the model volume and listens on the pod's address."""
    args = ["agent", "--broker", broker_url(pod.name, "$(ENGINE_BROKER_PASSWORD)"), "--name", pod.name]
    for device in sorted({device for devices in pod.devices.values() for device in devices}):
        args += ["--device", device]
    args += ["--models", MODELS_DIR, "--address", "$(POD_IP)", "--key-file", f"{KEYS_DIR}/deploy-key"]
    return {"name": "agent", "command": ["engine"], "args": args}
