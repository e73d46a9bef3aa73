"""Capture: whose code a Python frame runs, and the stack walks built on that answer.

Every stack walk in ``capture/`` asks this module, so they cannot disagree. A
frame belongs to the package its code's file lives in (the package's
directory, as Python imported it), never to a guess from a file name's ending:

``TORCH``      torch's package directory
``PYTHON``     Python's own machinery: the standard library, frozen modules
``GRADTRACE``  gradtrace's package directory, except the modules in
               :data:`PLAYS_THE_USER`
``LIBRARY``    any other installed distribution (a ``site-packages`` or
               ``dist-packages`` directory): transformers, trl, peft...
``USER``       everything else: scripts, tests, notebook cells, ``<stdin>``,
               ``<string>``, and :data:`PLAYS_THE_USER`

torch's and Python's frames are *machinery*: walks step over them. A cut is
located at the innermost user frame, with the innermost library frame beside
it when a library made the call; gradtrace's frames are its own work
(registering a tensor, computing value statistics) and are never a cut's site.

The torch frames the walks look for (``Module.__call__``, reentrant checkpointing,
a custom Function's backward) come from ``_torch_compat``'s probes.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from typing import Dict, Iterable, Tuple

import torch

from .._torch_compat import CHECKPOINT_FILE, FUNCTION_BACKWARD_CODES, MODULE_CALL_CODE, MODULE_CALL_FILE

__all__ = [
    "TORCH", "PYTHON", "GRADTRACE", "LIBRARY", "USER", "PLAYS_THE_USER",
    "kind_of", "is_machinery", "short_path", "locations", "user_location", "first_outside_machinery",
    "called_by_gradtrace", "module_caller", "checkpoint_on_stack", "checkpoint_caller",
    "innermost_module", "function_backward_on_stack",
]

TORCH, PYTHON, GRADTRACE, LIBRARY, USER = "torch", "python", "gradtrace", "library", "user"

# gradtrace modules that play the user's part: the demo is an example training script that
# ships inside the package; its model, losses and probe are the user's code in every report
# (a cut it makes is located at its own line). Named by module, resolved to exact files.
PLAYS_THE_USER = ("gradtrace.demo",)


def _package_dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__)) + os.sep


_TORCH_DIR = _package_dir(torch)
_GRADTRACE_DIR = _package_dir(sys.modules[__name__.split(".")[0]])
_USER_FILES = frozenset(os.path.join(_GRADTRACE_DIR, *name.split(".")[1:]) + ".py" for name in PLAYS_THE_USER)
_LIBRARY_DIRS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
_STDLIB_DIRS = tuple(sorted({os.path.abspath(sysconfig.get_paths()[key]) + os.sep
                             for key in ("stdlib", "platstdlib")}))

_KINDS: Dict[str, str] = {}  # co_filename -> kind; a handful of files, looked up on every frame of a walk


def _classify(filename: str) -> str:
    if filename.startswith("<"):
        # <frozen importlib._bootstrap> is Python's; <stdin>, <string>, <ipython-input-..> the user's.
        return PYTHON if filename.startswith("<frozen ") else USER
    path = os.path.abspath(filename)
    if path.startswith(_TORCH_DIR):
        return TORCH
    if path.startswith(_GRADTRACE_DIR):
        return USER if path in _USER_FILES else GRADTRACE
    if any(marker in path for marker in _LIBRARY_DIRS):
        return LIBRARY
    if path.startswith(_STDLIB_DIRS):
        return PYTHON
    return USER


def kind_of(filename: str) -> str:
    """``TORCH``, ``PYTHON``, ``GRADTRACE``, ``LIBRARY`` or ``USER``: whose file ``filename`` is."""
    kind = _KINDS.get(filename)
    if kind is None:
        kind = _KINDS[filename] = _classify(filename)
    return kind


def is_machinery(filename: str) -> bool:
    """torch's or Python's own code: what every walk steps over."""
    return kind_of(filename) in (TORCH, PYTHON)


def short_path(filename: str) -> str:
    """How a location names a file: relative to the working directory (``example.py``); a file of
    gradtrace or of an installed distribution from its package (``gradtrace/demo.py``,
    ``transformers/trainer.py``), wherever it is installed; any other as it is."""
    cwd = os.getcwd() + os.sep
    if filename.startswith(cwd):
        return filename[len(cwd):]
    if filename.startswith(_GRADTRACE_DIR):
        return os.path.relpath(filename, os.path.dirname(_GRADTRACE_DIR.rstrip(os.sep)))
    if any(marker in filename for marker in _LIBRARY_DIRS):
        return _library_path(filename)
    return filename


def _library_path(filename: str) -> str:
    """``transformers/trainer.py`` for a file inside an installed distribution."""
    marker = next(m for m in _LIBRARY_DIRS if m in filename)
    return filename.split(marker, 1)[1]


def locations(frame) -> Tuple[str, str]:
    """(the user's file:line, the innermost library frame's file:line or "") for a cut at ``frame``.

    Walking out: machinery and gradtrace's frames are stepped over; the first
    library frame is where a library made the call; the first user frame is the
    user's line. (``frame`` may be any object with ``f_code.co_filename``,
    ``f_lineno`` and ``f_back``.)
    """
    library = ""
    while frame is not None:
        filename = frame.f_code.co_filename
        kind = kind_of(filename)
        if kind == USER:
            return f"{short_path(filename)}:{frame.f_lineno}", library
        if kind == LIBRARY and not library:
            library = f"{_library_path(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return library or "<unknown>", library


def user_location(frame=None) -> str:
    """file:line of the first frame that is the user's (not torch's, Python's, gradtrace's or a library's)."""
    return locations(frame or sys._getframe(1))[0]


def first_outside_machinery(frame):
    """The first frame, from ``frame`` outwards, that is not torch's or Python's (None when none is)."""
    while frame is not None and is_machinery(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def called_by_gradtrace(frame) -> bool:
    """Is the first frame outside torch and Python, from ``frame`` outwards, gradtrace's own?"""
    frame = first_outside_machinery(frame)
    return frame is not None and kind_of(frame.f_code.co_filename) == GRADTRACE


def module_caller(frame):
    """The frame that called a module, seen from one of its hooks: the first outside ``Module.__call__``'s
    file and gradtrace's hooks."""
    while frame is not None and (frame.f_code.co_filename == MODULE_CALL_FILE
                                 or kind_of(frame.f_code.co_filename) == GRADTRACE):
        frame = frame.f_back
    return frame


def checkpoint_on_stack(frame):
    """The checkpointed callable's frame when reentrant checkpointing runs this code, else None.

    That frame is the one torch's checkpoint code called: its ``self`` names the
    checkpointed module even when a library checkpoints a layer's ``forward``
    rather than the module call (transformers 5 does).
    """
    called = None
    while frame is not None:
        if frame.f_code.co_filename == CHECKPOINT_FILE:
            return called if called is not None else frame
        called = frame
        frame = frame.f_back
    return None


def checkpoint_caller(segment):
    """The frame that called ``checkpoint(...)``: the first frame outside the machinery above the segment.

    (The segment's own frames are the checkpointed block's body; pointing there
    names a line inside the block instead of the checkpoint call to change.)
    """
    return first_outside_machinery(segment.f_back)


def innermost_module(frame, module_ids: Iterable[int]):
    """The innermost module in ``module_ids`` (a dict or set of ids) whose call is on the stack, or None.

    A module's call is on the stack while its forward or its hooks run (torch's
    call-implementation frame, whose ``self`` is the module, is below them).
    """
    while frame is not None:
        if frame.f_code is MODULE_CALL_CODE:
            module = frame.f_locals.get("self")
            if module is not None and id(module) in module_ids:
                return module
        frame = frame.f_back
    return None


def function_backward_on_stack(frame) -> bool:
    """Is a custom autograd Function's backward running below ``frame``?

    That is the only way one engine run starts from inside another (reentrant
    checkpointing's backward recomputes its segment and runs backward on it).
    """
    codes = FUNCTION_BACKWARD_CODES
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False

