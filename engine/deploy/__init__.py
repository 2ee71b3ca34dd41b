"""Deploying a graph onto a cluster: ``engine deploy k8s`` renders it as Kubernetes manifests.

:mod:`engine.deploy.planning` plans the graph as the cluster will run it (each node on its pod),
:mod:`engine.deploy.pods` says what runs in which pod and what each pod requests, :mod:`engine.deploy.credentials`
makes the deployment's secrets, :mod:`engine.deploy.k8s` turns all that into manifests and
:mod:`engine.deploy.cli_deploy` writes them.
"""

from engine.errors import EngineError


class DeployError(EngineError):
    """A deployment cannot be rendered as asked (a flag's value, the output folder)."""


__all__ = ["DeployError"]
