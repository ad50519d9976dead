"""mcproxy: a memcached proxy whose routing is scripted in Lua.

The public names are imported lazily, so that the pure modules
(``mcproxy.wire.request``, ``mcproxy.backends.hashing`` ...) load without Twisted.
"""

from mcproxy import compiled
from mcproxy._version import __version__

compiled.install()  # MCPROXY_PURE_PYTHON: no compiled modules (mcproxy.compiled)

__all__ = ["ProxyService", "__version__", "makeService"]


def __getattr__(name: str):
    if name == "ProxyService":
        from mcproxy.app.service import ProxyService

        return ProxyService
    if name == "makeService":
        from mcproxy.app.tap import makeService

        return makeService
    raise AttributeError(f"module 'mcproxy' has no attribute {name!r}")
