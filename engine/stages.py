"""The contract between the engine and a model family.

A model family (``nodes/wan``, ``nodes/qwen_image``) declares, as plain data, the stages of each task it
supports: which components each stage needs and which tensors it consumes and produces, with dtypes and
symbolic shapes. That declaration is all the engine needs to validate a graph, derive what each edge
carries and size its buffers, without importing torch or loading a weight.

At run time a worker asks the family to load only the components its node's stages need and to build the
stages; a stage then runs one request at a time on tensors. This module imports no heavy library: a
family's declaration must stay importable in milliseconds (``engine validate`` answers in well under a
second), so families import torch and diffusers only inside their runtime methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from engine.spec.schema import StepCacheSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from engine.backends.recipe import ExportRecipe
    from engine.parallel import Split

#: Dtype names used in tensor declarations and graph files. ``model`` stands for the graph's model dtype.
DTYPES = ("float32", "bfloat16", "float16", "uint8", "int64", "int32", "bool")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int64": 8, "int32": 4, "bool": 1}
MODEL_DTYPE = "model"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a stage produces.

    ``shape`` holds one expression per dimension: an integer or an arithmetic expression over the symbols
    the family derives from the request and the model configs (``"(num_frames - 1) // t_scale + 1"``).
    ``dtype`` is a name from :data:`DTYPES` or ``"model"`` for the graph's model dtype. ``optional`` tensors
    may be absent from a request (``negative_prompt_embeds`` without guidance); buffers are sized as if
    present. ``variable`` dimensions are bounded by their expression but may be shorter in a request (a
    prompt's token count): an edge then carries exactly the bytes of the real shape.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False
    variable: tuple[int, ...] = ()


@dataclass(frozen=True)
class StageSpec:
    """One stage of a task: the components it needs, the tensors it reads and the tensors it writes."""

    name: str
    components: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    description: str = ""
    #: Request fields naming files the stage reads (an input image): a node on another host than the controller
    #: gets them over the data plane (:mod:`engine.plan.feeder`).
    reads: tuple[str, ...] = ()
    #: How the stage can split across the ranks of a several-device replica (:mod:`engine.parallel`): ``cfg`` (its
    #: guided prediction's branches on different ranks) and ``ulysses`` (its tokens); empty: it cannot split.
    splits: tuple[str, ...] = ()
    #: The stage's loop calls a DiT once per step and guidance branch through :mod:`engine.stepcache`: a node's
    #: ``cache:`` and a request's ``cache`` field apply to it.
    step_cached: bool = False
    #: The family exports this stage's work as graphs (:meth:`ModelFamily.export_recipes`): graph backends
    #: (onnxruntime, openvino, tensorrt) can serve it.
    exportable: bool = False
    #: Request fields the outputs depend on, besides the weights, when nothing else does (no input tensors, no
    #: randomness): a worker may then keep outputs for requests that repeat them (:mod:`engine.worker.output_cache`);
    #: a field in ``reads`` counts by its file's bytes. None: the stage always runs.
    cache_key: tuple[str, ...] | None = None
    #: Parts of a cacheable stage's outputs that depend on fewer fields (a text encoder's embeddings of the prompt,
    #: and of the negative prompt): each kept under a key of its own, so that a request sharing only a part's fields
    #: (the usual negative prompt) reuses that part. The stage runs them one by one (:meth:`Stage.run_part`).
    cache_parts: tuple["CachePart", ...] = ()


@dataclass(frozen=True)
class CachePart:
    """Outputs of a stage that depend only on the weights and ``fields``, computed alone by ``Stage.run_part``
    exactly as :meth:`Stage.run` computes them."""

    name: str
    fields: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ComponentSpec:
    """A loadable part of a model.

    ``folder`` is the diffusers-layout subfolder it lives in (``vae``); ``prefixes`` restricts it to the
    parameters whose names start with one of them (the encoder half of the VAE), empty for the whole
    module. ``weights`` is False for tokenizers, processors and schedulers. ``dtype`` fixes the dtype a
    component always runs in whatever the node's dtype (the Wan VAE runs in float32), None for the node's.
    """

    name: str
    folder: str
    prefixes: tuple[str, ...] = ()
    weights: bool = True
    dtype: str | None = None


#: The validation context under which a request's files are checked (their content, by a family's validator):
#: where the request is made. A worker validates without it: its input files may come over the data plane.
CHECK_FILES = {"check_files": True}


class RequestParams(BaseModel):
    """Base of a family's request parameters. Families subclass it with their fields and rules.

    Unknown keys are rejected; values are checked by field and model validators, whose messages the
    engine reports with the file and line of the request they came from. Fields typed ``Path`` are files
    (an input image); a validator that looks into one does so only under :data:`CHECK_FILES`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the initial noise.")
    cache: StepCacheSpec | None = Field(
        None, description="Step caching for this request, over the DiT node's cache: METHOD:THRESHOLD (teacache:0.2, "
                          "magcache, fbcache) or none to run every DiT pass.")
    preview_every: int | None = Field(
        None, ge=0, le=1000, description="A preview of the denoising every N steps, over the DiT node's preview "
                                         "setting; 0: none.")

    #: Request fields that bound buffer sizes (``height``, ``width``, ``num_frames``...): the planner sizes
    #: edge buffers at the largest value of each the graph admits.
    size_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def file_fields(cls) -> tuple[str, ...]:
        """The fields that name files (typed ``Path``)."""
        return tuple(name for name, info in cls.model_fields.items() if info.annotation is Path)

    def resolve_paths(self, base: Path) -> "RequestParams":
        """A copy whose relative file paths are resolved against ``base``, validated with the files checked
        (:data:`CHECK_FILES`)."""
        values = self.model_dump()
        for name in self.file_fields():
            if not values[name].is_absolute():
                values[name] = base / values[name]
        return type(self).model_validate(values, context=CHECK_FILES)


#: A model's component configs: component folder (``vae``, ``transformer``...) -> its parsed ``config.json``.
Configs = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ConfigProblem:
    """Something in a model's component configs that a family's stages cannot run, naming the config field."""

    folder: str  #: component folder (``vae``)
    key: str  #: field of its config.json (``z_dim``)
    message: str

    def __str__(self) -> str:
        return f"{self.folder}/config.json {self.key}: {self.message}"


@dataclass(frozen=True)
class SequenceShape:
    """What sequence parallelism splits in a request's DiT: the attention heads and the tokens it attends over."""

    heads: int
    tokens: int
    hidden: int  #: width of a token's hidden state (heads x head dimension)


@dataclass(frozen=True)
class RequestProblem:
    """A request value a model cannot take (a size off its token grid), naming the request field."""

    field: str  #: request field (``height``)
    message: str  #: what is wrong and what would do, without the field's name

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def token_grid_problems(sizes: Mapping[str, int], steps: Mapping[str, int], why: str) -> list[RequestProblem]:
    """Each of ``sizes`` (``height``: 48) that is not a multiple of its step in ``steps`` (pixels one transformer
    token covers; ``why`` says how the model makes them), with the nearest sizes that are."""
    problems = []
    for field_name, value in sizes.items():
        step = steps[field_name]
        if value % step:
            below = value - value % step
            nearest = f"{below} or {below + step}" if below else str(step)
            problems.append(RequestProblem(field_name, f"{value} is not a multiple of {step}: {why}; use {nearest}"))
    return problems


#: Reports denoising progress: ``progress(step, total)`` after each step.
ProgressFn = Callable[[int, int], None]


class Stage(ABC):
    """A loaded stage, ready to run requests. Built by :meth:`ModelFamily.build_stage`."""

    spec: StageSpec

    @abstractmethod
    def run(
        self, request: RequestParams, inputs: Mapping[str, "torch.Tensor"], progress: ProgressFn
    ) -> dict[str, "torch.Tensor"]:
        """Run one request: read ``inputs`` (named as in ``spec.inputs``), return ``spec.outputs`` by name."""

    def parts(self, request: RequestParams) -> tuple[str, ...]:
        """The ``spec.cache_parts`` ``request`` needs, by name (a negative prompt only with guidance on); empty: the
        stage caches whole (a stage declaring parts overrides this and :meth:`run_part`)."""
        return ()

    def run_part(self, part: str, request: RequestParams) -> dict[str, "torch.Tensor"]:
        """The outputs of one of :meth:`parts`, alone."""
        raise NotImplementedError(f"stage {self.spec.name!r} has no cache parts")

    def split(self, split: "Split") -> None:
        """From now on compute this rank's share of every request (a stage whose spec declares ``splits``); every
        rank of the group runs :meth:`run` on the same inputs and returns the whole outputs."""
        raise NotImplementedError(f"stage {self.spec.name!r} cannot split across devices")


@dataclass
class LoadedComponents:
    """What a node replica holds: component name -> object (module, tokenizer, scheduler...)."""

    objects: dict[str, Any] = field(default_factory=dict)

    def parameter_bytes(self) -> dict[str, int]:
        """Resident parameter and buffer bytes per component (0 for components without weights)."""
        sizes: dict[str, int] = {}
        for name, obj in self.objects.items():
            total = 0
            if hasattr(obj, "parameters"):
                seen: set[int] = set()
                for tensor in [*obj.parameters(), *obj.buffers()]:
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        total += tensor.numel() * tensor.element_size()
            sizes[name] = total
        return sizes


class ModelFamily(ABC):
    """A model family: its tasks, their stages, and how to load and run them.

    The declaration methods (``tasks`` to ``request_type``, ``check_configs``, ``shape_symbols``,
    ``request_problems``, ``find_source``) must not import torch or diffusers. The runtime methods (``resolve_source`` onwards) may.
    """

    name: ClassVar[str]
    #: Task names (``t2v``, ``i2v``).
    tasks: ClassVar[tuple[str, ...]]
    #: Named model presets a graph may give as ``model.path`` (``tiny``, ``bench``), besides folders and repo ids.
    presets: ClassVar[tuple[str, ...]] = ()

    # -- declaration (no heavy imports) -------------------------------------------------------------------

    @abstractmethod
    def stages(self, task: str) -> tuple[StageSpec, ...]:
        """The task's stages in execution order."""

    @abstractmethod
    def components(self, task: str) -> dict[str, ComponentSpec]:
        """Every component the task's stages may name, by name."""

    @abstractmethod
    def request_type(self, task: str) -> type[RequestParams]:
        """The pydantic model of a request for ``task``."""

    @abstractmethod
    def check_configs(self, task: str, configs: Configs) -> list[ConfigProblem]:
        """What in the model's configs the task's stages cannot run (latent geometry the family has no
        pipeline for, components that disagree on it); empty when they can. ``configs`` holds the config of
        every weighted component folder the task uses."""

    @abstractmethod
    def shape_symbols(self, task: str, configs: Configs, request: RequestParams) -> dict[str, int]:
        """Values of the symbols used in the stages' shape expressions, for configs that passed
        :meth:`check_configs`."""

    def sequence_shape(self, task: str, configs: Configs, request: RequestParams) -> SequenceShape | None:
        """The heads and tokens Ulysses splits in the task's DiT for ``request``; None where the family's transformer
        cannot split its sequence (the plan then refuses ``parallel.ulysses``)."""
        return None

    def split_refusal(self, kind: str) -> str:
        """Why the family's DiT cannot split by ``kind`` (``cfg``, ``ulysses``), shown when a graph asks for it."""
        return f"the {self.name} transformer has no {kind} split in this engine"

    @abstractmethod
    def request_problems(self, task: str, configs: Configs, request: RequestParams) -> list[RequestProblem]:
        """What in ``request`` the model of ``configs`` (which passed :meth:`check_configs`) cannot run: sizes off
        its token grid, by request field; empty when it can. The one rule of the family: the plan applies it to
        every request, default and limit before any worker starts, and the stages to every request they run."""

    @abstractmethod
    def find_source(self, task: str, path: str) -> Path | None:
        """The local diffusers-layout folder for ``path`` if it is there without building anything: None for
        a preset not built yet. Raises :class:`~engine.errors.ModelError` as :meth:`resolve_source` does."""

    # -- runtime (may import torch / diffusers) -----------------------------------------------------------

    @abstractmethod
    def resolve_source(self, task: str, path: str) -> Path:
        """Return a local diffusers-layout folder for ``path``: a preset (built locally on first use and
        cached), a local folder, or a Hugging Face repo id (from the local cache when offline). Raises
        :class:`~engine.errors.ModelError` with what was tried when nothing is found."""

    @abstractmethod
    def load_components(
        self, task: str, names: tuple[str, ...], source: Path, device: str, dtype: str
    ) -> LoadedComponents:
        """Instantiate exactly the named components from ``source`` on ``device`` in ``dtype``."""

    @abstractmethod
    def build_stage(
        self, task: str, name: str, components: LoadedComponents, device: str, dtype: str, configs: Configs
    ) -> Stage:
        """A runnable stage over already-loaded components. ``configs`` are the model's component configs as
        the plan read them: what a stage needs of a component it does not hold (the VAE's latent channels and
        scale factors, for the denoising loop) comes from them, never from a library's default."""

    def export_recipes(self, task: str, stage: Stage) -> tuple["ExportRecipe", ...]:
        """What of a built stage declared ``exportable`` a graph backend runs instead of PyTorch: the module to
        export, its input shapes per request, and where the backend's call goes (``engine.backends``)."""
        return ()

    @abstractmethod
    def write_output(
        self,
        request: RequestParams,
        outputs: Mapping[str, "torch.Tensor"],
        out_dir: Path,
        stem: str,
        *,
        meta: Mapping[str, Any] | None = None,
        save_frames: bool = False,
    ) -> list[Path]:
        """Write a request's final tensors (decoded frames) as files; return their paths.

        ``meta`` (graph, model, node facts) goes into the sidecar JSON next to the request; ``save_frames``
        also writes the raw decoded frames, for exact comparison (a video file is lossy).
        """
