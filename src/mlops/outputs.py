"""Where outputs may go: never onto or inside an input, never onto each other, never outside their folder.

Checked before any work starts, so a refused run has written nothing. Paths are compared as real paths (symlinks,
``..`` and ``.`` resolved); URLs of object stores by their normalised path. Every check names each offending path.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from mlops.errors import DatasetError, MlopsError
from mlops.volumes import is_nifti_name

# A case id names one file in the output folder: one path component, no separators or control characters, not
# starting with a dot (no '.', '..' or hidden names), at most 200 characters.
SAFE_CASE = re.compile(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,199}")


class OutputError(MlopsError):
    """An output location that would lose or corrupt data (an input overwritten, outputs colliding) or cannot be
    written; ``status`` is the HTTP status a service would answer with."""

    status = 400


def real(path: Path) -> Path:
    """The real path, for comparisons (a path that does not exist yet resolves through its existing parents)."""
    return Path(os.path.realpath(path))


def is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it, after resolving both."""
    p, f = real(path), real(folder)
    return p == f or f in p.parents


def check_output_file(dst: Path, inputs: Iterable[Path]) -> None:
    """``dst`` (a segmentation file) replaces no input, has a NIfTI suffix, and can be written where it is."""
    for src in inputs:
        if real(dst) == real(src):
            raise OutputError(f"{dst}: this is the input scan; the segmentation would replace it (choose another -o)")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a folder; give a file name such as {dst / 'case_seg.nii.gz'}")
    if not is_nifti_name(dst.name):
        raise OutputError(f"{dst}: an output file must end in .nii.gz (compressed) or .nii")
    _check_writable_parent(dst)


def check_dicom_outputs(outputs: Iterable[Path], source: Path | None) -> None:
    """The files of a DICOM series' segmentation (``.dcm`` SEG, ``.nii.gz``): not the input, not inside an input
    folder (the SEG would join the series it segments), not a folder, writable."""
    for dst in outputs:
        if source is not None and is_within(dst, source):
            raise OutputError(
                f"{dst}: inside the input {source}; write the segmentation outside it (the default is a sibling "
                f"{source.name.removesuffix('.zip')}_seg.dcm)"
            )
        if dst.is_dir():
            raise OutputError(f"{dst}: is a folder; give a file name such as {dst / 'series_seg.dcm'}")
        _check_writable_parent(dst)


def check_output_folder(out_dir: Path, source: Path) -> None:
    """The output folder of a folder of inputs is neither that folder nor inside it, nor an existing file."""
    if is_within(out_dir, source):
        raise OutputError(
            f"{out_dir}: the output folder is, or is inside, the input folder {source}; "
            "choose a folder outside it (the default is a sibling <folder>_seg)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file, not a folder")
    _check_writable_parent(out_dir / "x")


def _check_writable_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a folder we may write into (the rest is created)."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write into {parent} (permission denied)")


def check_collisions(targets: Iterable[tuple[str, str]], hint: str = "") -> None:
    """(input, output) pairs: no two inputs may write the same output. Names every collision at once."""
    by_output: dict[str, list[str]] = defaultdict(list)
    for src, dst in targets:
        by_output[dst].append(src)
    clashes = {dst: srcs for dst, srcs in by_output.items() if len(srcs) > 1}
    if clashes:
        lines = [f"{dst} <- {', '.join(srcs)}" for dst, srcs in sorted(clashes.items())]
        shown = "\n  - ".join(lines[:20]) + ("\n  - ..." if len(lines) > 20 else "")
        raise OutputError(
            f"{len(clashes)} output(s) would be written by more than one input, and only the last would survive:"
            f"\n  - {shown}{hint}"
        )


def safe_case_id(case: str, where: str) -> str:
    """A case id from a manifest or a file name, usable as one file name in the output folder (no ``/``, ``..``)."""
    if not SAFE_CASE.fullmatch(case):
        raise DatasetError(
            f"{where}: case id {case!r} is not a single file name (no '/' or '\\', no leading '.', no control "
            "characters, at most 200 characters): it would be written outside the output folder or under a hidden name"
        )
    return case


def same_or_inside(dest: str, source: str) -> bool:
    """For URLs and paths on one filesystem (already stripped of their protocol): ``dest`` is ``source`` or inside."""
    d, s = posixpath.normpath(dest), posixpath.normpath(source)
    return d == s or d.startswith(s.rstrip("/") + "/")
