"""``engine run``'s own arguments without running anything: the output folder it checks up front, and the request
options derived from the families' request models."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.errors import OutputError
from engine.runtime.cli_run import prepare_output_folder
from engine.runtime.request_options import request_models, request_options

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


def test_request_option_help_names_the_families_that_have_the_field() -> None:
    options = {option.field: option for option in request_options()}
    assert options["guidance_scale"].help == "wan: Classifier-free guidance scale; <= 1 turns it off."
    assert options["guidance_scale"].metavar == "NUMBER"
    assert options["seed"].help == "Seed of the initial noise."  # the same in every model: no family named
    assert options["image"].help.startswith("qwen_image edit: Path of the image to edit")
    assert "wan i2v: Path of the first frame" in options["image"].help
    assert (options["num_frames"].metavar, options["image"].metavar, options["prompt"].metavar) == ("INT", "FILE", "TEXT")
    assert [o.field for o in request_options()][:2] == ["prompt", "image"]  # the required fields first


def test_request_values_are_collected_apart_from_the_command_options() -> None:
    args = build_parser().parse_args(["run", "g.yaml", "--guidance-scale", "3.5", "--num-frames", "17", "--quiet",
                                      "--out", "o"])
    assert args.request == {"guidance_scale": "3.5", "num_frames": "17"}  # validated later by the request model
    assert (args.quiet, args.out) == (True, Path("o"))
    assert not hasattr(args, "guidance_scale")
    assert build_parser().parse_args(["run", "g.yaml"]).request == {}
