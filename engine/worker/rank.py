"""A follower rank of a several-device replica: computes its share of the split stages rank 0 hands it.

It loads the node's components on its own device, joins the group (:mod:`engine.worker.group`), then waits on its
standard input for work from rank 0; it speaks on no control plane and holds no edge. When rank 0's pipe closes, or
any collective fails, it exits.

    python -m engine.worker.rank SPEC.json RANK STORE_PORT
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from engine.errors import EngineError
from engine.families import get_family
from engine.worker.contract import WorkerSpec
from engine.worker.group import Work, join_group, receive_tensors, step_agreed

log = logging.getLogger("engine.worker.rank")


class Stop(EngineError):
    """Rank 0 stopped the stage (its request was cancelled)."""


def serve(spec: WorkerSpec, rank: int, port: int) -> None:
    device = spec.devices[rank]
    family = get_family(spec.family)
    components = family.load_components(spec.task, spec.components, Path(spec.source), device, spec.dtype)
    stages = {name: family.build_stage(spec.task, name, components, device, spec.dtype, spec.configs)
              for name in spec.stages}
    split = join_group(spec.devices, spec.parallel, rank, port, spec.collective_timeout_s)
    for stage in stages.values():
        stage.split(split)
    log.info("rank %d of %s[%d] ready on %s", rank, spec.node, spec.replica, device)

    def progress(step: int, total: int) -> None:
        if not step_agreed(True, device):
            raise Stop("rank 0 stopped the stage")

    request_type = family.request_type(spec.task)
    for line in sys.stdin.buffer:
        work = Work.parse(line)
        torch.set_num_threads(work.threads)
        tensors = receive_tensors(work, device)
        try:
            stages[work.stage].run(request_type.model_validate(work.request), tensors, progress)
        except EngineError as exc:  # stopped, or refused the request as rank 0 did at the same point
            log.info("%s stopped: %s", work.stage, exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {argv[1]} %(name)s: %(message)s",
                        stream=sys.stdout)
    spec = WorkerSpec.read(Path(argv[0]))
    try:
        serve(spec, int(argv[1]), int(argv[2]))
    except Exception as exc:  # a broken group: rank 0 reports it, naming this rank
        log.error("rank %s stops: %s", argv[1], exc)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
