"""The modules mcproxy also builds as C extensions, and the switch that
runs it without them.

Where a C compiler is, setup.py builds ``mcproxy.wire._frames`` (framing
loops the wire layer also has in Python: ``_frames.pyx``),
``mcproxy.routing._keyloops`` (loops mcp.lua also has in Lua:
``_keyloops.pyx``),
``mcproxy.server.protocol``, ``mcproxy.writes``, ``mcproxy.units``,
``mcproxy.backends.latency``, ``mcproxy.backends.connection``,
``mcproxy.routing.runs`` and ``mcproxy.wire.reader`` (compiled by Cython
from their ``.py`` itself, typed by the ``.pxd`` beside it). Python imports an
extension module before a source module of the same name; with
``MCPROXY_PURE_PYTHON=1``, mcproxy/__init__.py puts :class:`PurePython`
first among the import finders, and each of these modules is imported from
its source, or not at all where it has none: the code mcproxy runs where no
compiler is, which the tests run too (scripts/test). The variable may also
name some of them, comma-separated (bench/opcodes.py names those built from
their own Python); a compiled module that uses another's extension types
(``cimport``, USES) is then imported from source too, as its C would read
the fields of a class that is not the type it was built against.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES, FileFinder, SourceFileLoader
from importlib.util import find_spec

#: The switch (an environment variable).
ENVIRON = "MCPROXY_PURE_PYTHON"
#: Each compiled module: True where it is built from its own ``.py``, False
#: where the Python code has its own fallback (the module is then missing).
MODULES = {"mcproxy.wire._frames": False, "mcproxy.routing._keyloops": False,
           "mcproxy.server.protocol": True,
           "mcproxy.writes": True, "mcproxy.units": True, "mcproxy.backends.latency": True,
           "mcproxy.backends.connection": True, "mcproxy.routing.runs": True,
           "mcproxy.wire.reader": True}

#: The compiled modules built against others' extension types (their .pxd
#: cimports): each runs from source wherever one of those does.
USES = {"mcproxy.server.protocol": ("mcproxy.writes",),
        "mcproxy.backends.connection": ("mcproxy.backends.latency", "mcproxy.wire.reader",
                                        "mcproxy.writes"),
        "mcproxy.routing.runs": ("mcproxy.units",)}


class PurePython:
    """An import finder that finds the sources of the modules the switch
    names, never their builds."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        sourced = MODULES.get(name)
        if sourced is None or name not in switched():
            return None
        if not sourced:
            raise ModuleNotFoundError(f"{name} is not imported: {ENVIRON} is set", name=name)
        for entry in path or ():
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None:
                return spec
        return None


def switched() -> frozenset[str]:
    """The modules the switch names: none (unset, empty, ``0``), all
    (``1``), or those listed and those that use them (USES)."""
    value = os.environ.get(ENVIRON, "").strip()
    if value in ("", "0"):
        return frozenset()
    if value == "1":
        return frozenset(MODULES)
    names = frozenset(name.strip() for name in value.split(","))
    unknown = names - MODULES.keys()
    if unknown:
        raise ValueError(f"{ENVIRON}: not a compiled module: {', '.join(sorted(unknown))}")
    while True:  # (until no module uses one switched)
        users = {user for user, used in USES.items() if names.intersection(used)}
        if users <= names:
            return names
        names |= users


def install() -> None:
    """With the switch on, import what it names from source (once per process)."""
    if switched() and PurePython not in sys.meta_path:
        sys.meta_path.insert(0, PurePython)


def running() -> list[str]:
    """Those of MODULES that this process imports compiled."""
    found = []
    for name in MODULES:
        try:
            spec = find_spec(name)
        except ImportError:
            continue
        if spec is not None and spec.origin and spec.origin.endswith(tuple(EXTENSION_SUFFIXES)):
            found.append(name)
    return found
