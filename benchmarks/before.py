"""Another gradtrace beside this one, in the same process: "before" in before/after benchmarks.

    load_before("main")            # a git ref of this repository, exported with ``git archive``
    load_before("/path/checkout")  # a directory holding a ``gradtrace`` package

The package is imported under another name (``gradtrace_before``); gradtrace's own
imports are relative, so the two never share a module or any state. Comparing in
one process, interleaved, is the only fair comparison on a shared machine:
separate runs see different loads.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "gradtrace_before"


def load_before(source: str, name: str = NAME) -> ModuleType:
    """The gradtrace package of ``source`` (a directory, or a git ref of this repository), as ``name``."""
    if os.path.isdir(os.path.join(source, "gradtrace")):
        folder = source
    else:
        folder = tempfile.mkdtemp(prefix="gradtrace-before-")
        archive = subprocess.run(["git", "-C", ROOT, "archive", source, "gradtrace"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    package = os.path.join(folder, "gradtrace")
    spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def submodule(package: ModuleType, dotted: str) -> ModuleType:
    """``package``'s submodule ``dotted`` (``integrations.transformers``), imported."""
    return importlib.import_module(f"{package.__name__}.{dotted}")
