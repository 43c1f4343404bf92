"""Every private scvi-tools name scqbm relies on, in one place.

scvi-tools exports no public API for these (module output keys, minified-data constants, the
saved-file reader, batch-category lookup, the VAE's encoder layout), and any release may
move or rename one. Importing them only from here keeps the exposure in one file, and
``tests/test_scvi_contract.py`` checks each of them against the installed scvi-tools, so a
release that changes one fails loudly there rather than somewhere inside training.

Tested with scvi-tools 1.4.2 (Python 3.11) and 1.5.1 (Python >= 3.12).
"""

from __future__ import annotations

from importlib.metadata import version

from scvi.data import _constants as data_constants
from scvi.data._constants import _ADATA_MINIFY_TYPE_UNS_KEY as ADATA_MINIFY_TYPE_UNS_KEY
from scvi.data._constants import _FIELD_REGISTRIES_KEY as FIELD_REGISTRIES_KEY
from scvi.data._constants import _MANAGER_UUID_KEY as MANAGER_UUID_KEY
from scvi.data._constants import _SCVI_UUID_KEY as SCVI_UUID_KEY
from scvi.data._constants import _SETUP_ARGS_KEY as SETUP_ARGS_KEY
from scvi.data._constants import _STATE_REGISTRY_KEY as STATE_REGISTRY_KEY
from scvi.data._constants import ADATA_MINIFY_TYPE
from scvi.data._utils import _get_adata_minify_type as get_adata_minify_type
from scvi.data.fields import CategoricalJointObsField
from scvi.model._utils import _get_batch_code_from_category as get_batch_code_from_category
from scvi.model._utils import get_max_epochs_heuristic
from scvi.model.base import _archesmixin, _base_model
from scvi.model.base._save_load import _load_saved_files as load_saved_files
from scvi.module._constants import MODULE_KEYS

#: The installed scvi-tools version, e.g. ``"1.5.1"``.
SCVI_VERSION = version("scvi-tools")

#: Key of the category counts in a categorical-covariates field's state registry.
N_CATS_PER_KEY = CategoricalJointObsField.N_CATS_PER_KEY

#: Prefix of every key scvi-tools' ``setup_anndata`` writes into ``obs``/``obsm``/``uns``.
SCVI_KEY_PREFIX = "_scvi_"

#: scvi-tools modules that call ``_load_saved_files`` through their own module global
#: (``load`` and ``load_query_data``): verified loading swaps it there.
SAVED_FILE_READERS = (_base_model, _archesmixin)

#: Attribute of ``scvi.module.VAE`` holding the encoder, and of that encoder holding its
#: ``FCLayers`` trunk (the part scqbm keeps, with scVI's covariate injection).
VAE_ENCODER_ATTR = "z_encoder"
ENCODER_TRUNK_ATTR = "encoder"


def vae_encoder_trunk(vae):
    """The ``FCLayers`` trunk of an ``scvi.module.VAE``'s latent encoder."""
    return getattr(getattr(vae, VAE_ENCODER_ATTR), ENCODER_TRUNK_ATTR)


__all__ = [
    "ADATA_MINIFY_TYPE",
    "ADATA_MINIFY_TYPE_UNS_KEY",
    "ENCODER_TRUNK_ATTR",
    "FIELD_REGISTRIES_KEY",
    "MANAGER_UUID_KEY",
    "MODULE_KEYS",
    "N_CATS_PER_KEY",
    "SAVED_FILE_READERS",
    "SCVI_KEY_PREFIX",
    "SCVI_UUID_KEY",
    "SCVI_VERSION",
    "SETUP_ARGS_KEY",
    "STATE_REGISTRY_KEY",
    "VAE_ENCODER_ATTR",
    "data_constants",
    "get_adata_minify_type",
    "get_batch_code_from_category",
    "get_max_epochs_heuristic",
    "load_saved_files",
    "vae_encoder_trunk",
]
