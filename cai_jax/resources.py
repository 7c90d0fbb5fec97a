"""Where the files the project ships beside its code live: gin/, constitutions/, data/.

In a checkout (and an editable install) they sit at the repository root, beside the
``cai_jax`` package. A wheel or a plain ``pip install .`` copies them into the package as
``cai_jax/_resources/`` (``setup.py``), so the CLI finds its presets, default
constitution and prompt sets wherever it is installed.
"""

from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
"""The ``cai_jax`` package directory."""

IMPORT_ROOT = os.path.dirname(PACKAGE_DIR)
"""The directory that holds the package (the checkout, or site-packages): what a child
process needs on PYTHONPATH to import ``cai_jax``."""

RESOURCE_DIRS = ("gin", "constitutions", "data")
"""The shipped directories, relative to RESOURCE_ROOT."""

_INSTALLED = os.path.join(PACKAGE_DIR, "_resources")
RESOURCE_ROOT = _INSTALLED if os.path.isdir(_INSTALLED) else IMPORT_ROOT
"""The directory holding gin/, constitutions/ and data/."""

GIN_DIR = os.path.join(RESOURCE_ROOT, "gin")
PRESET_DIR = os.path.join(GIN_DIR, "models")
CONSTITUTIONS_DIR = os.path.join(RESOURCE_ROOT, "constitutions")
DATA_DIR = os.path.join(RESOURCE_ROOT, "data")


def resolve(path: str) -> str:
  """A relative path is looked up in the working directory, then under RESOURCE_ROOT (so
  'data/...', 'constitutions/...' name the shipped files from any directory); `path`
  itself when neither exists."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  candidate = os.path.join(RESOURCE_ROOT, path)
  return candidate if os.path.exists(candidate) else path
