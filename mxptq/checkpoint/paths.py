"""The one containment rule for the files mxptq reads from a checkpoint folder and writes next to
its output.

Reading: a file belongs to a checkpoint folder when its name is a plain relative name (no `..`,
not absolute) and its real path, symlinks resolved, lies inside the folder's root. The root is
the folder itself, or, for a Hugging Face hub cache snapshot (`.../models--org--name/snapshots/
<revision>`, whose files are symlinks into `../../blobs`), the repository's cache folder.

Writing: the output folder and its hidden siblings must neither contain nor lie inside the
input's root (checked on real paths, so a symlinked folder cannot slip past).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import MxptqError


def containment_root(folder: Path) -> Path:
    """The real folder whose contents a checkpoint folder may reference."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def inside(root: Path, path: Path) -> bool:
    """`path` is `root` or below it (both taken as given; resolve them first)."""
    return path == root or root in path.parents


def resolve_strict(path: Path) -> Path:
    """The real path of an existing file; MxptqError for a dangling link or a link loop."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as e:  # ELOOP, ENOENT
        raise MxptqError(f"{path}: cannot be resolved ({e.strerror or e})") from e


def plain_name(name: object, where: str) -> str:
    """A file name as an index may give it: a non-empty relative name with no `..` part."""
    if not isinstance(name, str) or not name:
        raise MxptqError(f"{where}: {name!r} is not a file name")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("\\") or ".." in p.parts or "\\" in name \
            or "\x00" in name:
        raise MxptqError(f"{where}: file name {name!r} points outside the checkpoint folder")
    return name


def member(folder: Path, name: str, where: str) -> Path:
    """`folder / name` once it is known to stay inside the folder's root."""
    path = folder / plain_name(name, where)
    if not os.path.lexists(path):
        return path  # the caller reports a missing file in its own words
    real = resolve_strict(path)
    if not inside(containment_root(folder), real):
        raise MxptqError(f"{where}: {name} is a link to {real}, outside the checkpoint folder")
    return path


def check_disjoint(model_dir: Path, outputs: list[Path]) -> None:
    """Refuse output paths that contain the input or lie inside it (either way an --overwrite
    or a rename could delete or change what we read)."""
    root = containment_root(model_dir)
    real_in = Path(os.path.realpath(model_dir))
    for out in outputs:
        real = Path(os.path.realpath(out))
        if inside(root, real) or inside(real_in, real):
            raise MxptqError(f"--out {out}: must not be the input folder or inside it "
                             f"({model_dir})")
        if inside(real, real_in) or inside(real, root):
            raise MxptqError(f"--out {out}: contains the input folder {model_dir}; choose an "
                             "output folder outside it")
