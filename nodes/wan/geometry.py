"""The latent geometry of a Wan model, from its component configs (no torch import).

The pipelines read the VAE's strides off ``vae.config.scale_factor_temporal`` / ``scale_factor_spatial`` and
fall back to Wan2.1's (4, 8) when built without a VAE, which is how the denoising node runs: every stage
takes them from the configs instead, so a model with another VAE runs as its monolithic pipeline does.
The checks refuse, by config field, what these stages cannot run.

Wan2.2 TI2V-5B's pipelines run with ``expand_timesteps`` (its ``model_index.json``): a timestep per latent token
instead of one per step. The engine reads component configs only, so the stages take it from the one component
that tells that model apart: its Wan2.2 VAE, the only AutoencoderKLWan that patchifies (``vae.patch_size``); the
loader holds it against ``model_index.json`` (:mod:`nodes.wan.loading`). Its image to video is task ``ti2v``; the
other image-to-video tasks refuse such a model, naming that task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.models.config_fields import ConfigFields
from engine.stages import ConfigProblem, Configs, RequestProblem, token_grid_problems

#: The strides AutoencoderKLWan gives a config written before it had ``scale_factor_temporal`` and
#: ``scale_factor_spatial`` (the Wan2.1 repos'): what such a model's VAE reports when loaded.
STRIDES_OF_OLDER_CONFIGS = (4, 8)
#: Requested heights and widths are multiples of this many pixels; frame counts are FRAME_STEP * k + 1.
SIZE_STEP = 16
FRAME_STEP = 4
#: What to run instead when another image-to-video task meets a TI2V-5B model.
TI2V_INSTEAD = "its image to video is task ti2v (graphs/wan22_ti2v.yaml)"


@dataclass(frozen=True)
class LatentGeometry:
    channels: int  #: latent channels, ``vae.z_dim``
    t_scale: int  #: frames per latent frame (after the first), ``vae.scale_factor_temporal``
    s_scale: int  #: pixels per latent pixel on each side, ``vae.scale_factor_spatial``
    expand_timesteps: bool  #: Wan2.2 TI2V-5B: a timestep per latent token (the pipelines' ``expand_timesteps``)
    patch: tuple[int, int, int]  #: latent frames, rows and columns per transformer token, ``transformer.patch_size``

    @property
    def token_pixels(self) -> tuple[int, int]:
        """Rows and columns of pixels one transformer token covers (TI2V-5B: 16 x 2 = 32)."""
        return self.s_scale * self.patch[1], self.s_scale * self.patch[2]


def expands_timesteps(vae: Mapping[str, Any]) -> bool:
    """Whether the model of this VAE config is a TI2V-5B one, whose pipelines give each latent token its timestep."""
    return vae.get("patch_size") is not None


def ti2v_model_problem(task: str, vae: Mapping[str, Any]) -> ConfigProblem:
    """Why another image-to-video task than ti2v cannot run a TI2V-5B model (one whose VAE patchifies)."""
    return ConfigProblem("vae", "patch_size", f"{vae['patch_size']}, the Wan2.2 VAE of a TI2V-5B model: "
                                              f"{TI2V_INSTEAD}, not {task}")


def latent_geometry(configs: Configs) -> LatentGeometry:
    """The geometry of configs that passed :func:`config_problems`."""
    vae = configs["vae"]
    t_scale, s_scale = STRIDES_OF_OLDER_CONFIGS
    patch_t, patch_h, patch_w = configs["transformer"]["patch_size"]
    return LatentGeometry(channels=vae["z_dim"], t_scale=vae.get("scale_factor_temporal", t_scale),
                          s_scale=vae.get("scale_factor_spatial", s_scale),
                          expand_timesteps=expands_timesteps(vae), patch=(patch_t, patch_h, patch_w))


def request_problems(geometry: LatentGeometry, height: int, width: int, num_frames: int) -> list[RequestProblem]:
    """Sizes off the model's token grid, by request field: the pipelines would round them down (a video of another
    size than the one asked for) or fail in the transformer, so the plan refuses them at validation and the
    denoising stage at run time, both by this rule."""
    token_h, token_w = geometry.token_pixels
    why = (f"a transformer token of this model covers {token_h}x{token_w} pixels (vae scale_factor_spatial "
           f"{geometry.s_scale} x transformer patch_size {list(geometry.patch[1:])})")
    problems = token_grid_problems({"height": height, "width": width}, {"height": token_h, "width": token_w}, why)
    latent_frames = (num_frames - 1) // geometry.t_scale + 1
    if latent_frames % geometry.patch[0]:
        problems.append(RequestProblem("num_frames", f"{num_frames} makes {latent_frames} latent frames, not a multiple "
                                                     f"of the transformer's patch_size {geometry.patch[0]} in time"))
    return problems


def config_problems(task: str, configs: Configs) -> list[ConfigProblem]:
    """What in the VAE and transformer configs the Wan stages cannot run, by config field."""
    fields = ConfigFields(configs)
    z_dim = fields.get("vae", "z_dim", int)
    downsample = fields.get("vae", "temperal_downsample", list)
    vae_patch = fields.get("vae", "patch_size", (int, type(None)), absent=None)
    strides = [fields.get("vae", key, int, absent=default)
               for key, default in zip(("scale_factor_temporal", "scale_factor_spatial"), STRIDES_OF_OLDER_CONFIGS)]
    statistics = {key: fields.get("vae", key, list) for key in ("latents_mean", "latents_std")}
    patch = fields.get("transformer", "patch_size", list)
    in_channels = fields.get("transformer", "in_channels", int)
    out_channels = fields.get("transformer", "out_channels", int)
    if fields.problems:
        return fields.problems

    if len(patch) != 3 or not all(isinstance(size, int) and size > 0 for size in patch):
        fields.refuse("transformer", "patch_size", f"{patch}; expected [frames, rows, columns], positive integers")
        return fields.problems

    # 1. The strides the config states are the ones its architecture has (the VAE-less denoising node and
    #    the decoder must agree on them without comparing notes).
    geometry = latent_geometry(configs)
    compression = {"scale_factor_temporal": 2 ** sum(bool(d) for d in downsample),
                   "scale_factor_spatial": 2 ** len(downsample) * (vae_patch or 1)}
    for (key, built), stated in zip(compression.items(), strides):
        if stated != built:
            fields.refuse("vae", key, f"{stated}, but the VAE compresses {built}x (temperal_downsample {downsample}"
                          f"{f', patch_size {vae_patch}' if vae_patch else ''})")

    # 2. Every request the family admits maps onto whole latent frames.
    if FRAME_STEP % geometry.t_scale:
        fields.refuse("vae", "scale_factor_temporal", f"{geometry.t_scale}; it must divide {FRAME_STEP} "
                      f"(requests have {FRAME_STEP}k+1 frames)")
    # A token covering more pixels than SIZE_STEP (TI2V-5B's 32) leaves some sizes off the token grid: those requests
    # are refused by request_problems (the pipelines round them down, to another size than the one requested).

    # 3. The components agree on the number of latent channels.
    for key, values in statistics.items():
        if len(values) != z_dim:
            fields.refuse("vae", key, f"{len(values)} values for vae z_dim = {z_dim} latent channels")
    if out_channels != z_dim:
        fields.refuse("transformer", "out_channels",
                      f"{out_channels}; the transformer predicts the vae's z_dim = {z_dim} channels")
    conditioning = task.removesuffix("_experts")
    if conditioning == "i2v" and geometry.expand_timesteps:
        # Its in_channels would be refused too, as a consequence rather than a fault of its own: name the task instead.
        fields.problems.append(ti2v_model_problem(task, configs["vae"]))
    else:
        # I2V: noise, first-frame mask, image latent; TI2V-5B: the image latent in place of the first noisy frame.
        expected_in = 2 * z_dim + geometry.t_scale if conditioning == "i2v" else z_dim
        if in_channels != expected_in:
            fields.refuse("transformer", "in_channels",
                          f"{in_channels}; {task} with vae z_dim = {z_dim} feeds it {expected_in}")

    # 4. TI2V-5B's image to video needs a timestep per latent token (the first frame's is 0), which the stages give
    #    exactly to a model whose VAE patchifies.
    if task == "ti2v" and vae_patch is None:
        fields.refuse("vae", "patch_size", "not set; ti2v runs Wan2.2 TI2V-5B, whose VAE patchifies (patch_size 2) "
                      "and whose pipeline gives every latent token its timestep (expand_timesteps)")

    # 5. Two experts: the low-noise one runs on what the high-noise one runs on.
    if task.endswith("_experts"):
        for key in ("in_channels", "out_channels", "patch_size"):
            high, low = configs["transformer"].get(key), fields.get("transformer_2", key, (int, list))
            if low is not None and low != high:
                fields.refuse("transformer_2", key, f"{low}; the high-noise expert (transformer) has {high}")

    # 6. The experts and TI2V-5B take no CLIP image tokens (their tasks have no image_encode stage).
    if task.endswith("_experts") or task == "ti2v":
        for folder in ("transformer", "transformer_2") if task.endswith("_experts") else ("transformer",):
            image_dim = fields.get(folder, "image_dim", (int, type(None)), absent=None)
            if image_dim is not None:
                fields.refuse(folder, "image_dim", f"{image_dim}; {task} has no CLIP image tokens for it (null)")
    return fields.problems
