"""
Writing outputs without leaving half-written files behind: everything is written under a temporary name next to
its destination and renamed into place only once complete. A crash, Ctrl-C or a raised error leaves the destination
as it was (absent, or the previous complete version).

Files and folders get the usual modes (0644 / 0755 under the default umask), not the 0600 / 0700 that
`tempfile` gives its temporary files and folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_mode(is_dir: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _apply_default_modes(root: Path) -> None:
    """Gives `root` and everything below it the modes a plain `open()` / `mkdir()` would have given them."""
    file_mode, dir_mode = _default_mode(False), _default_mode(True)
    paths = [root] + list(root.rglob("*")) if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def _replace(source: Path, target: Path, scratch_parent: Path) -> None:
    """Renames `source` to `target`; a folder at `target` (which a rename cannot replace) is moved aside first."""
    if target.is_dir() and not target.is_symlink():
        old = Path(tempfile.mkdtemp(dir=scratch_parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike, *, directory: bool = False, merge: bool = False) -> Iterator[Path]:
    """
    Yields a temporary path next to `destination` (same file system) to write a file, or with `directory=True` a
    folder, into; on a clean exit it is renamed to `destination`, replacing what was there. On an error the temporary
    path is removed and `destination` is left untouched.

        with atomic_path("out/model", directory=True) as staging:
            model.save_pretrained(staging)

    With `merge=True` (folders only) `destination` is a folder that other outputs share (a training run's final
    model beside its checkpoint-N folders, the stage-2 export beside earlier ones): each entry written into the
    temporary folder (created inside `destination`) is renamed into `destination`, replacing the same-named entry,
    and the folder's other entries stay.
    """
    if merge and not directory:
        raise ValueError("atomic_path(merge=True) writes into a folder: pass directory=True too.")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}.tmp-"
    if merge:
        destination.mkdir(exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=destination, prefix=".tmp-"))
    elif directory:
        temporary = Path(tempfile.mkdtemp(dir=destination.parent, prefix=prefix))
    else:
        handle, name = tempfile.mkstemp(dir=destination.parent, prefix=prefix)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        _apply_default_modes(temporary)
        if merge:
            for entry in sorted(temporary.iterdir()):
                _replace(entry, destination / entry.name, destination)
        elif directory:
            _replace(temporary, destination, destination.parent)
        else:
            os.replace(temporary, destination)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def write_text_atomically(destination: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `destination` through a temporary file and a rename."""
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")
