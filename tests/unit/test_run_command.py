"""``engine run``'s own arguments without running anything: the output folder it checks up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import OutputError
from engine.runtime.cli_run import prepare_output_folder

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
