"""Writing outputs safely, and recording the environment that produced them.

Every output of wanda-serve appears whole or not at all: it is built beside its final place and
renamed into it at the end. A directory it replaces (--overwrite) is moved aside first and put
back if anything fails, so a failed run never costs the user the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

from wanda_serve.errors import WandaServeError

log = logging.getLogger(__name__)

RECORDED_PACKAGES = ("wanda-serve", "torch", "transformers", "safetensors", "accelerate", "gguf", "numpy", "tokenizers")


def cache_dir() -> Path:
    return Path(os.environ.get("WANDA_SERVE_CACHE", Path.home() / ".cache" / "wanda-serve"))


def check_output_dir(out: Path, overwrite: bool) -> None:
    resolved = out.resolve()
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        # Replacing it would pull the directory out from under the user's shell.
        raise WandaServeError(f"output {out} is the current directory or one that holds it; name a new directory")
    if out.is_symlink() and not out.exists():
        # The finished directory could not be renamed onto it: refused now, not after the work.
        raise WandaServeError(f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist; name a new directory")
    if out.exists() and not out.is_dir():
        raise WandaServeError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise WandaServeError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing ancestors of `path`; returns those created, deepest first, to remove on failure."""
    missing = [parent for parent in path.parents if not parent.exists()]
    for parent in reversed(missing):
        parent.mkdir()
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (someone else wrote there), or already gone: leave it and what holds it


def _private_temp_dir(out: Path, suffix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    # mkdtemp makes the directory private (0700); an output gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and restored if the rename fails."""
    if not out.exists():
        tmp.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(aside / out.name)
    try:
        tmp.rename(out)
    except BaseException:
        (aside / out.name).rename(out)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        log.warning("could not remove the replaced output, left in %s", aside)


@contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block completes.

    On any failure (interrupts included) the temporary directory and any parent directories made for
    it are removed, and a directory `out` that existed is left as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    created: list[Path] = []
    try:
        created = _make_parents(out)
        tmp = _private_temp_dir(out, ".partial")
    except OSError as e:
        _remove_empty(created)
        raise WandaServeError(f"cannot write output {out}: {e.strerror or e}") from e
    try:
        yield tmp
        try:
            _move_into_place(tmp, out)
        except OSError as e:
            raise WandaServeError(f"cannot move the finished output into {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextmanager
def replacing_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """For long jobs of several stages, each written atomically inside `out`: build at `out` itself.

    An existing `out` (with overwrite) is moved aside first: on failure the new stages are removed and
    it is put back; on success it is deleted. A failed job in a new `out` keeps the stages it finished.
    The files keep the paths they will have, so what they record about each other stays true.
    """
    check_output_dir(out, overwrite)
    aside = None
    if out.is_dir() and any(out.iterdir()):
        try:
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(aside / out.name)
        except OSError as e:
            raise WandaServeError(f"cannot move the previous {out} aside: {e.strerror or e}") from e
    try:
        yield out
    except BaseException:
        if aside is not None:
            shutil.rmtree(out, ignore_errors=True)
            (aside / out.name).rename(out)
            aside.rmdir()
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def check_output_file(path: Path, overwrite: bool, option: str = "output") -> None:
    if path.is_dir():
        raise WandaServeError(f"{option} {path} is a directory; name a file")
    if (path.exists() or path.is_symlink()) and not overwrite:  # a link to nothing is there too: the rename would replace it
        raise WandaServeError(f"{option} {path} exists (use --overwrite to replace it)")


@contextmanager
def atomic_files(outputs: Sequence[tuple[Path, str]], overwrite: bool = False) -> Iterator[list[Path]]:
    """Temporary files beside the output files, for the block to write, renamed into place in order only
    if the block completes; on any failure all are removed, with any directories made for them, and what
    was at the outputs before is untouched. Each output is a (path, the option that named it) pair. A
    temporary keeps its output's suffix (`.NAME.XXXX.partial.gguf`): some readers go by it."""
    for path, option in outputs:
        check_output_file(path, overwrite, option)
    created: list[Path] = []  # deepest first, to remove on failure
    temporaries: list[Path] = []
    try:
        for path, option in outputs:
            try:
                created = _make_parents(path) + created
                handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
                os.close(handle)
            except OSError as e:
                raise WandaServeError(f"cannot write {option} {path}: {e.strerror or e}") from e
            temporaries.append(Path(name))
        yield temporaries
        umask = os.umask(0)
        os.umask(umask)
        for tmp, (path, option) in zip(temporaries, outputs):
            try:
                tmp.chmod(0o666 & ~umask)  # mkstemp makes files private; an output gets the usual permissions
                tmp.replace(path)
            except OSError as e:
                raise WandaServeError(f"cannot move the finished {option} into {path}: {e.strerror or e}") from e
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise


def write_file_atomically(path: Path, text: str, overwrite: bool = False, option: str = "output") -> None:
    """Write text to path whole or not at all; an existing file is replaced only with `overwrite`."""
    with atomic_files([(path, option)], overwrite) as (tmp,):
        try:
            tmp.write_text(text)
        except OSError as e:
            raise WandaServeError(f"cannot write {option} {path}: {e.strerror or e}") from e


def read_json_file(path: Path) -> dict:
    """A JSON object from a file wanda-serve wrote, with one clear error when it is unreadable or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WandaServeError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise WandaServeError(f"cannot read {path}: expected a JSON object, found {type(data).__name__}")
    return data


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{name: package_version(name) for name in RECORDED_PACKAGES}}
