"""Sphinx configuration of the lightning_ldm documentation (``make docs``).

The API reference is generated at build time: ``autosummary`` walks the package recursively (every public module,
``_private`` ones skipped) and ``autodoc`` + ``napoleon`` render the Google-style docstrings, so a renamed or new
module appears without editing this folder. The guides are Markdown (MyST). Nothing is fetched at build time (no
intersphinx inventories, a theme that ships with Sphinx).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, whatever else is installed

import lightning_ldm  # noqa: E402

project = "lightning_ldm"
author = "The lightning_ldm authors"
copyright = "2026, The lightning_ldm authors"
release = lightning_ldm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# API reference: one page per public module, generated into api/ at build time (git-ignored).
autosummary_generate = True
autosummary_ignore_module_all = True
autodoc_default_options = {
    # Document each object where it is defined: the package's re-exports (``__all__``) are left to their modules,
    # so nothing is described twice.
    "ignore-module-all": True,
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

html_theme = "alabaster"
html_title = f"lightning_ldm {release}"
html_static_path: list[str] = []
