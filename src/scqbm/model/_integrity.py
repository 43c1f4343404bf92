"""Saved-model integrity: a SHA-256 manifest, loading without code execution, no secrets.

``QBMVAE.save`` writes scvi-tools' files (``model.pt``, optionally ``adata.h5ad``) and then
``manifest.json`` with the SHA-256 digest and size of each. ``QBMVAE.load`` hashes the files
and compares them with the manifest *before* anything is unpickled, then unpickles
``model.pt`` with ``torch.load(weights_only=True)`` (tensors, numpy arrays and plain
containers only; no code can run) and hands the result to scvi-tools' own load logic in
place of its ``torch.load(weights_only=False)``. To make that possible the training history
(pandas DataFrames, which ``weights_only`` cannot read) is stored as plain arrays and turned
back into DataFrames on load.

What this protects against: a corrupted or changed file (a flipped byte, a truncated copy, a
file swapped for another) is refused; a crafted pickle cannot run code through
``QBMVAE.load``. What it does not: someone who can rewrite the files can rewrite the manifest
as well, so the manifest alone proves integrity, not origin; pass the digest that ``save``
logged (``expected_sha256=``, the SHA-256 of ``manifest.json``) to also pin the origin. Files
saved without a manifest (by scvi-tools or an older scqbm) load only with
``allow_unverified=True``, and then through scvi-tools' own loader, which unpickles with
``weights_only=False`` and must be trusted like any pickle.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from scqbm._compat import FIELD_REGISTRIES_KEY

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "scqbm-model-manifest/1"
#: Words that mark a constructor argument as a secret (never written into a saved model).
SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "sdk_code", "credential")
_FRAME_TAG = "__scqbm_dataframe__"


class ModelIntegrityError(ValueError):
    """A saved model's files do not match their manifest, or cannot be read safely."""


# ------------------------------------------------------------------------ secrets
def _is_secret(key) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in SECRET_WORDS)


def strip_secrets(value, path: str = "") -> tuple[object, list[str]]:
    """A deep copy of ``value`` without secret-named keys, and the dotted paths removed."""
    removed: list[str] = []

    def walk(node, where):
        if isinstance(node, dict):
            kept = {}
            for key, item in node.items():
                here = f"{where}.{key}" if where else str(key)
                if _is_secret(key) and item is not None:
                    removed.append(here)
                    continue
                kept[key] = walk(item, here)
            return type(node)(kept) if type(node) is not dict else kept
        if isinstance(node, list | tuple):
            return type(node)(walk(item, f"{where}[{i}]") for i, item in enumerate(node))
        return copy.deepcopy(node)

    return walk(value, path), removed


# ------------------------------------------------------------------------ history
def history_to_plain(history: dict) -> dict:
    """Training-history DataFrames as plain arrays that ``weights_only`` can read."""
    plain = {}
    for key, frame in (history or {}).items():
        if not isinstance(frame, pd.DataFrame):
            plain[key] = frame
            continue
        try:
            values, index = _numeric(frame.to_numpy()), _numeric(frame.index.to_numpy())
        except (TypeError, ValueError):
            logger.warning("History %r is not numeric; it is not saved with the model.", key)
            continue
        plain[key] = {
            _FRAME_TAG: True,
            "values": values,
            "index": index,
            "index_name": None if frame.index.name is None else str(frame.index.name),
            "columns": [str(c) for c in frame.columns],
        }
    return plain


def _numeric(values: np.ndarray) -> np.ndarray:
    # Numeric arrays keep their dtype (float32 metrics stay float32); others become float64.
    values = np.asarray(values)
    return values if values.dtype.kind in "biuf" else values.astype(np.float64)


def history_from_plain(history: dict) -> dict:
    """Undo :func:`history_to_plain`."""
    frames = {}
    for key, value in (history or {}).items():
        if isinstance(value, dict) and value.get(_FRAME_TAG):
            index = pd.Index(value["index"], name=value["index_name"])
            frames[key] = pd.DataFrame(value["values"], index=index, columns=value["columns"])
        else:
            frames[key] = value
    return frames


# ----------------------------------------------------------------------- manifest
def _file_names(dir_path: str, prefix: str | None) -> list[str]:
    prefix = prefix or ""
    names = [f"{prefix}model.pt", f"{prefix}adata.h5ad", f"{prefix}mdata.h5mu"]
    return [name for name in names if os.path.isfile(os.path.join(dir_path, name))]


def _sha256(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def write_manifest(dir_path: str, prefix: str | None = None) -> str:
    """Write ``{prefix}manifest.json`` for the saved files; return the manifest's SHA-256."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        scqbm_version = version("scqbm")
    except PackageNotFoundError:  # pragma: no cover - source tree without metadata
        scqbm_version = "unknown"
    files = {}
    for name in _file_names(dir_path, prefix):
        digest, size = _sha256(os.path.join(dir_path, name))
        files[name] = {"sha256": digest, "bytes": size}
    manifest = {"format": MANIFEST_FORMAT, "scqbm_version": scqbm_version, "files": files}
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    path = os.path.join(dir_path, f"{prefix or ''}{MANIFEST_NAME}")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(raw)
    os.replace(tmp, path)
    return hashlib.sha256(raw).hexdigest()


def read_verified(
    dir_path: str, prefix: str | None = None, expected_sha256: str | None = None
) -> bytes:
    """The bytes of ``model.pt`` after checking every file against the manifest.

    Raises
    ------
    FileNotFoundError
        There is no manifest (a model saved by scvi-tools or an older scqbm).
    ModelIntegrityError
        The manifest is malformed or does not match ``expected_sha256``, a file is missing,
        extra or changed.

    """
    dir_path = os.fspath(dir_path)
    path = os.path.join(dir_path, f"{prefix or ''}{MANIFEST_NAME}")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise ModelIntegrityError(
            f"{path} does not have the expected SHA-256 {expected_sha256}: this is not the "
            "model that was saved with that digest."
        )
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        assert manifest["format"] == MANIFEST_FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ModelIntegrityError(f"{path} is not a valid scqbm model manifest.") from None
    model_name = f"{prefix or ''}model.pt"
    present = set(_file_names(dir_path, prefix))
    if model_name not in files or set(files) != present:
        raise ModelIntegrityError(
            f"The files in {dir_path} ({sorted(present)}) are not those its manifest lists "
            f"({sorted(files)}); refusing to load a changed model directory."
        )
    model_bytes = b""
    for name, entry in files.items():
        file_path = os.path.join(dir_path, name)
        if name == model_name:  # hashed from the very bytes that will be unpickled
            with open(file_path, "rb") as handle:
                model_bytes = handle.read()
            digest, size = hashlib.sha256(model_bytes).hexdigest(), len(model_bytes)
        else:
            digest, size = _sha256(file_path)
        if not isinstance(entry, dict) or (digest, size) != (
            entry.get("sha256"),
            entry.get("bytes"),
        ):
            raise ModelIntegrityError(
                f"{file_path} has changed since it was saved (SHA-256 {digest}, {size} bytes; "
                f"the manifest says {entry}). Refusing to load it: the file is corrupted or "
                "was modified. Restore it from the original copy."
            )
    return model_bytes


# ------------------------------------------------------------------------ loading
def _numpy_safe_globals() -> list:
    """What numpy arrays (numeric and string) need under ``weights_only=True``."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUOM"] + [
        type(np.dtype("m8")),
    ]
    # bytes: numpy pickles an empty array's buffer as `bytes()` under protocol 2.
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *set(dtypes), bytes]


def safe_torch_load(model_bytes: bytes, map_location=None) -> dict:
    """Unpickle ``model.pt`` bytes with ``weights_only=True`` (no code can run)."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(
                io.BytesIO(model_bytes), map_location=map_location, weights_only=True
            )
    except Exception as err:  # UnpicklingError, or anything a hostile file provokes
        reason = next(
            (line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line),
            f"{type(err).__name__}: {str(err)[:300]}",
        )
        raise ModelIntegrityError(
            f"model.pt cannot be read with torch.load(weights_only=True): {reason} Models saved "
            "by QBMVAE.save always can; this file holds other objects."
        ) from None


_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def scvi_loads_from(model: dict, dir_path: str, prefix: str | None) -> Iterator[None]:
    """Make scvi-tools' ``BaseModelClass.load`` use the already verified ``model`` dict.

    scvi-tools calls its module-level ``_load_saved_files``, which unpickles with
    ``weights_only=False``; for the duration of one ``QBMVAE.load`` it is replaced by a
    function that returns ``model`` (and reads the AnnData as scvi would). Other calls pass
    through to the original.
    """
    import anndata

    from scqbm._compat import SAVED_FILE_READERS as modules
    from scqbm._compat import load_saved_files as original

    target = os.path.abspath(os.fspath(dir_path))

    def load_saved_files(path, load_adata, prefix=prefix, map_location=None, backup_url=None):
        if os.path.abspath(os.fspath(path)) != target:
            return original(path, load_adata, prefix, map_location, backup_url)
        attr_dict = dict(model["attr_dict"])
        attr_dict["history_"] = history_from_plain(attr_dict.get("history_"))
        attr_dict["registry_"] = _registry_from_plain(attr_dict["registry_"])
        state = dict(model["model_state_dict"])  # scvi moves the module to the device after
        adata = None
        if load_adata:
            adata_path = os.path.join(path, f"{prefix or ''}adata.h5ad")
            adata = anndata.read_h5ad(adata_path) if os.path.exists(adata_path) else False
        return attr_dict, model["var_names"], state, adata

    with _PATCH_LOCK:
        for module in modules:
            module._load_saved_files = load_saved_files
        try:
            yield
        finally:
            for module in modules:
                module._load_saved_files = original


def load_checked(
    dir_path, prefix: str | None, allow_unverified: bool, expected_sha256: str | None = None
) -> dict | None:
    """The verified, safely unpickled ``model.pt`` dict; ``None`` to use scvi's own loader.

    ``None`` only with ``allow_unverified=True`` for a directory without a manifest.
    """
    try:
        model_bytes = read_verified(dir_path, prefix, expected_sha256)
    except FileNotFoundError:
        if not allow_unverified:
            raise ModelIntegrityError(
                f"{os.fspath(dir_path)} has no {prefix or ''}{MANIFEST_NAME}: it was not saved "
                "by QBMVAE.save (or by a version before manifests), so its files cannot be "
                "verified. Pass allow_unverified=True to load it anyway through scvi-tools' "
                "loader, which unpickles with weights_only=False: only for files from a "
                "source you trust."
            ) from None
        logger.warning(
            "Loading %s without verification (allow_unverified=True): scvi-tools unpickles "
            "it with weights_only=False.",
            os.fspath(dir_path),
        )
        return None
    return safe_torch_load(model_bytes, map_location="cpu")


@contextlib.contextmanager
def saving_safely(model) -> Iterator[list[str]]:
    """While scvi saves ``model``: no secrets in ``init_params_``, history as plain arrays.

    Yields the dotted names of the secrets left out. The live model is unchanged afterwards.
    """
    params = getattr(model, "init_params_", None)
    history = getattr(model, "history_", None)
    clean, removed = strip_secrets(params)
    if removed:
        logger.info(
            "Not saving %s with the model (secrets); a loaded remote sampler reads its token "
            "from $SCQBM_SAMPLER_TOKEN.",
            ", ".join(removed),
        )
    registry = model.registry_
    model.init_params_ = clean
    model.history_ = history_to_plain(history) if isinstance(history, dict) else history
    model.registry_ = _registry_to_plain(registry)
    try:
        yield removed
    finally:
        model.init_params_ = params
        model.history_ = history
        model.registry_ = registry


# weights_only cannot rebuild a defaultdict; scvi's registry holds one at the top.
_DEFAULTDICT_KEYS = (FIELD_REGISTRIES_KEY,)


def _registry_to_plain(registry: dict) -> dict:
    plain = dict(registry)
    for key in _DEFAULTDICT_KEYS:
        if isinstance(plain.get(key), collections.defaultdict):
            plain[key] = dict(plain[key])
    return plain


def _registry_from_plain(registry: dict) -> dict:
    registry = dict(registry)
    for key in _DEFAULTDICT_KEYS:
        if isinstance(registry.get(key), dict):
            registry[key] = collections.defaultdict(dict, registry[key])
    return registry
