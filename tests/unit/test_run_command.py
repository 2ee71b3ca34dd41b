"""``engine run``'s own arguments without running anything: the output folder it checks up front, and the request
options derived from the families' request models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from engine.cli import build_parser
from engine.errors import OutputError
from engine.controller.cli_run import prepare_output_folder
from engine.families import get_family
from engine.controller.request_options import options_for, request_models, request_options
from engine.stages import RequestParams

# -- the output folder ------------------------------------------------------------------------------------------


def test_the_output_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    prepare_output_folder(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []  # the write check leaves nothing behind
    prepare_output_folder(folder)  # an existing folder is fine


@pytest.mark.parametrize("make, why", [
    (lambda tmp: tmp / "file", "it is a file, not a folder"),
    (lambda tmp: tmp / "file" / "x", "{tmp}/file is not a folder"),
    (lambda tmp: Path("/dev/null/x"), "/dev/null is not a folder"),
    (lambda tmp: Path("/proc/x"), "cannot create it (No such file or directory)"),
    (lambda tmp: Path("/proc"), "cannot write in it ("),
], ids=["a_file", "under_a_file", "under_dev_null", "in_proc", "proc_itself"])
def test_a_folder_the_run_cannot_use_is_refused(tmp_path: Path, make, why: str) -> None:
    (tmp_path / "file").write_text("x")
    folder = make(tmp_path)
    with pytest.raises(OutputError) as caught:
        prepare_output_folder(folder)
    assert str(caught.value).startswith(f"output folder {folder}: {why.format(tmp=tmp_path)}")
    assert str(caught.value).endswith("; choose another with --out")


# -- request options -------------------------------------------------------------------------------------------


def test_every_request_field_of_every_family_is_an_option_with_its_description() -> None:
    options = {option.field: option for option in request_options()}
    for label, model in request_models().items():
        for name, info in model.model_fields.items():
            option = options[name]
            assert option.flag == "--" + name.replace("_", "-")
            assert info.description in option.help, (label, name, option.help)
    assert set(options) == {name for model in request_models().values() for name in model.model_fields}
    assert {"wan t2v", "wan i2v", "qwen_image t2i", "qwen_image edit"} <= set(request_models())


def models_of(*families: str) -> dict[str, type[RequestParams]]:
    """The request models of ``families``' tasks, by ``"family task"``: tests of the help text name the families
    they describe, so that installing another family changes none of them."""
    return {f"{name} {task}": get_family(name).request_type(task)
            for name in families for task in get_family(name).tasks}


def test_request_option_help_names_the_families_that_have_the_field() -> None:
    options = {option.field: option for option in options_for(models_of("qwen_image", "wan"))}
    assert options["guidance_scale"].help == "wan: Classifier-free guidance scale; <= 1 turns it off."
    assert options["guidance_scale"].metavar == "NUMBER"
    assert options["seed"].help == "Seed of the initial noise."  # the same in every model: no family named
    assert options["image"].help.startswith("qwen_image edit: Path of the image to edit")
    assert "wan i2v, wan ti2v, wan i2v_experts: Path of the first frame" in options["image"].help
    assert (options["num_frames"].metavar, options["image"].metavar, options["prompt"].metavar) == ("INT", "FILE", "TEXT")
    assert list(options)[:2] == ["prompt", "image"]  # the required fields first


class OtherRequest(RequestParams):
    prompt: str = Field(min_length=1, description="What the picture shows.")
    guidance_scale: float = Field(1.0, description="Another guidance scale.")


def test_a_family_with_a_field_of_its_own_description_is_named_beside_the_others() -> None:
    options = {option.field: option for option in options_for({**models_of("wan"), "other t2i": OtherRequest})}
    assert options["guidance_scale"].help == ("wan: Classifier-free guidance scale; <= 1 turns it off. "
                                              "other: Another guidance scale.")
    assert options["prompt"].help == "wan: What the video shows. other: What the picture shows."
    assert options["num_frames"].help == "wan: Number of frames, 4k+1 (1, 5, ..., 81)."


def test_request_values_are_collected_apart_from_the_command_options() -> None:
    args = build_parser().parse_args(["run", "g.yaml", "--guidance-scale", "3.5", "--num-frames", "17", "--quiet",
                                      "--out", "o"])
    assert args.request == {"guidance_scale": "3.5", "num_frames": "17"}  # validated later by the request model
    assert (args.quiet, args.out) == (True, Path("o"))
    assert not hasattr(args, "guidance_scale")
    assert build_parser().parse_args(["run", "g.yaml"]).request == {}
