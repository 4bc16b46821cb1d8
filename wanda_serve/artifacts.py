"""Writing outputs safely, and recording the environment that produced them."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from wanda_serve.errors import WandaServeError

RECORDED_PACKAGES = ("wanda-serve", "torch", "transformers", "safetensors", "accelerate", "gguf", "numpy", "tokenizers")


def cache_dir() -> Path:
    return Path(os.environ.get("WANDA_SERVE_CACHE", Path.home() / ".cache" / "wanda-serve"))


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WandaServeError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise WandaServeError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")


@contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block completes."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    # mkdtemp makes the directory private (0700); the output gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
