"""Sphinx configuration of the scqbm documentation (scverse cookiecutter layout).

Build (warnings are errors, tutorials executed at small CI settings)::

    docs/build.sh

or by hand::

    .venv/bin/python -m sphinx -W --keep-going -n -T -b html docs docs/_build/html

Environment variables read here:

``SCQBM_DOCS_EXECUTE``
    myst-nb execution mode of the tutorials: ``force`` (default: run every notebook on each
    build), ``cache`` (re-run only notebooks whose code changed), ``off`` (render the stored
    outputs, which are empty in the repository).
``SCQBM_DOCS_INTERSPHINX``
    ``1`` links to the Python, NumPy, AnnData, scanpy, scvi-tools and PyTorch docs. Off by
    default: fetching inventories needs the internet, and a failed fetch is a warning, which
    ``-W`` turns into an error.

The tutorials read ``SCQBM_TUTORIAL_*`` variables in their ``parameters`` cell (see
``docs/build.sh``).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "extensions"))

# -- Project information -------------------------------------------------------------------

info = metadata("scqbm")
project_name = info["Name"]
project = project_name
author = info["Author"] or "scqbm developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = info["Version"]
urls = dict(pu.split(", ") for pu in info.get_all("Project-URL") or [])
repository_url = urls.get("Source", "https://github.com/scqbm/scqbm")

needs_sphinx = "7.0"
templates_path = ["_templates"]
html_static_path = ["_static"]
bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "alpha"
bibtex_reference_style = "author_year"

html_context = {
    "display_github": True,
    "github_user": repository_url.rstrip("/").split("/")[-2],
    "github_repo": repository_url.rstrip("/").split("/")[-1],
    "github_version": "main",
    "conf_py_path": "/docs/",
}

# -- Extensions ----------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
    "sphinx_autodoc_typehints",
    "IPython.sphinxext.ipython_console_highlighting",
    *[p.stem for p in (HERE / "extensions").glob("*.py")],
]

USE_INTERSPHINX = os.environ.get("SCQBM_DOCS_INTERSPHINX", "0") == "1"
if USE_INTERSPHINX:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/docs/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
    }

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autoclass_content = "class"
default_role = "literal"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# Attributes sections as :ivar: fields: the class template documents attributes itself.
napoleon_use_ivar = True
typehints_defaults = "braces"
typehints_use_signature = False
typehints_use_signature_return = False
always_document_param_types = False

myst_heading_anchors = 6
myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
]
myst_url_schemes = ("http", "https", "mailto")

# -- Notebooks (myst-nb) -------------------------------------------------------------------

nb_execution_mode = os.environ.get("SCQBM_DOCS_EXECUTE", "force")
nb_execution_timeout = int(os.environ.get("SCQBM_DOCS_NB_TIMEOUT", "900"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_output_stderr = "remove"
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "python3"}

source_suffix = {
    ".rst": "restructuredtext",
    ".md": "myst-nb",
    ".ipynb": "myst-nb",
}

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "build.sh"]

# -- Cross-references ----------------------------------------------------------------------

# Broken references to scqbm's own API are errors; references into other packages resolve
# only when intersphinx is on (SCQBM_DOCS_INTERSPHINX=1), so they are not checked otherwise.
# SCQBM_DOCS_NITPICKY=0 turns the check off (e.g. to see every other warning first).
nitpicky = os.environ.get("SCQBM_DOCS_NITPICKY", "1") == "1"
_EXTERNAL = (
    r"(anndata|AnnData|scanpy|scvi|torch|lightning|numpy|np|pandas|pd|scipy|dimod|kaiwu|mudata"
    r"|sparse|fastapi|uvicorn|httpx|starlette|pydantic"
    r"|matplotlib|collections|typing|abc|pathlib|argparse|builtins|Tensor|Distribution"
    r"|nn|optional|callable|array-like"
    # scvi-tools' own type alias, named in docstrings scqbm inherits (shap_predict).
    r"|AnnOrMuData)([.\w]*)"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    # Type-hint words that are not objects.
    (r"py:.*", r"(Literal|Callable|Iterator|Sequence|Mapping|Any|Self|None|int|float|str|bool"
               r"|dict|list|tuple|type|object|bytes)(\[.*\])?"),
    (r"py:.*", r"default.*|shape.*|\(.*\)"),
    # Private names that appear in public docstrings and annotations: the abstract method a
    # sampler backend implements, and the common base class of the two relaxations.
    (r"py:meth", r"_sample"),
    (r"py:class", r"scqbm\.nn\._relaxations\._Relaxation"),
    # Module-level constants of private modules, named in docstrings with their values.
    (r"py:data", r"NAMED_DIMOD_SAMPLERS|EXACT_COMPARE_UNITS|EXACT_ENERGY_UNITS"),
    # Private modules named in docstrings (implementation notes, not API).
    (r"py:mod", r"scqbm(\.\w+)*\._\w+"),
]

# -- HTML ----------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_css_files = ["css/custom.css"]
html_title = project_name
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
pygments_style = "default"
