"""The multistep scheduler's state as tensors: what the high-noise expert hands the low-noise one.

UniPCMultistepScheduler (Wan's) keeps, between steps, the converted model outputs and timesteps of the last
``solver_order`` steps, the sample before the last predictor update (for the next corrector), the order of that
update, how many steps of history it has and the index of the next step. Written out after the high-noise
expert's last step and restored into a scheduler set to the same timesteps, the low-noise expert's steps compute
exactly what one loop over both experts computes. The tensors are those of :data:`nodes.wan.family.SCHEDULER_STATE`;
a scheduler that has taken no step has no state to hand over (none of them is sent).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import UniPCMultistepScheduler

from engine.errors import ModelError
from nodes.wan.family import MAX_SOLVER_ORDER


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler whose state this module cannot hand over."""
    if not isinstance(scheduler, UniPCMultistepScheduler):
        raise ModelError(f"the experts hand over UniPCMultistepScheduler state; the model's scheduler is "
                         f"{type(scheduler).__name__}")
    if scheduler.config.solver_order > MAX_SOLVER_ORDER:
        raise ModelError(f"scheduler solver_order {scheduler.config.solver_order}: the experts hand over at most "
                         f"{MAX_SOLVER_ORDER} steps of history")
    if scheduler.solver_p is not None:
        raise ModelError("a UniPC scheduler with a solver_p keeps that solver's state too; the experts cannot hand "
                         "it over")


def scheduler_state(scheduler: UniPCMultistepScheduler) -> dict[str, torch.Tensor]:
    """The state after the last step taken; empty when no step was."""
    if scheduler.step_index is None:
        return {}
    filled = scheduler.lower_order_nums  # the history is the last ``filled`` entries of each list
    return {
        "scheduler_model_outputs": torch.stack(scheduler.model_outputs[-filled:]),
        "scheduler_timesteps": torch.stack(scheduler.timestep_list[-filled:]),
        "scheduler_last_sample": scheduler.last_sample,
        "scheduler_counters": torch.tensor([scheduler.step_index, filled, scheduler.this_order]),
    }


def restore_scheduler_state(scheduler: UniPCMultistepScheduler, tensors: Mapping[str, torch.Tensor],
                            device: torch.device) -> None:
    """Put a handed-over state into ``scheduler``, freshly set to the same timesteps; nothing when none was sent."""
    if "scheduler_counters" not in tensors:
        return
    step_index, filled, this_order = (int(value) for value in tensors["scheduler_counters"])
    order = scheduler.config.solver_order
    if not 0 < filled <= order or filled != len(tensors["scheduler_model_outputs"]):
        raise ModelError(f"handed-over scheduler state has {filled} steps of history for solver_order {order}")
    empty = [None] * (order - filled)
    scheduler.model_outputs = empty + list(tensors["scheduler_model_outputs"].to(device).unbind(0))
    scheduler.timestep_list = empty + list(tensors["scheduler_timesteps"].to(device).unbind(0))
    scheduler.last_sample = tensors["scheduler_last_sample"].to(device)
    scheduler.lower_order_nums, scheduler.this_order = filled, this_order
    scheduler._step_index = step_index
