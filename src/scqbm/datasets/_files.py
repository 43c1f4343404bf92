"""Where dataset files live: explicit paths, ``$SCQBM_DATA_DIR``, a shared data folder, a cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

#: Environment variable naming a folder that holds dataset files (checked first).
DATA_DIR_ENV = "SCQBM_DATA_DIR"
#: Environment variable overriding the cache folder (default ``~/.cache/scqbm``).
CACHE_DIR_ENV = "SCQBM_CACHE_DIR"


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says where it looked."""


def cache_dir() -> Path:
    """The folder where downloaded or rebuilt datasets are kept."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "scqbm"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def candidate_paths(filename: str) -> list[Path]:
    """Places a dataset file is looked for, in order.

    ``$SCQBM_DATA_DIR/filename``; ``shared/data/filename`` in the working directory, the
    package's folder or any of their parents (a checkout next to a shared data folder); the
    cache folder.
    """
    found: list[Path] = []
    if os.environ.get(DATA_DIR_ENV):
        found.append(Path(os.environ[DATA_DIR_ENV]).expanduser() / filename)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            found.append(folder / "shared" / "data" / filename)
    found.append(cache_dir() / filename)
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def find_file(filename: str) -> Path | None:
    """The first existing candidate path of ``filename``, or ``None``."""
    return next((path for path in candidate_paths(filename) if path.is_file()), None)


def download(url: str, target: Path, *, timeout: float = 60.0, sha256: str | None = None) -> Path:
    """Download ``url`` to ``target`` atomically; check ``sha256`` when given.

    Raises
    ------
    DatasetUnavailableError
        When the server cannot be reached or the checksum does not match.

    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "scqbm"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise DatasetUnavailableError(f"Could not download {url}: {err}.") from err
    if sha256 is not None and (got := sha256_of(tmp)) != sha256:
        tmp.unlink(missing_ok=True)
        raise DatasetUnavailableError(
            f"Checksum mismatch for {url}: expected sha256 {sha256}, got {got}. The server "
            "returned a different file; nothing was kept."
        )
    tmp.replace(target)
    return target
