"""mcproxy: a memcached proxy whose routing is scripted in Lua.

The public names are imported lazily, so that the pure modules
(``mcproxy.protocols.request``, ``mcproxy.hashing`` ...) load without Twisted.
"""

from mcproxy._version import __version__

__all__ = ["ProxyService", "__version__", "makeService"]


def __getattr__(name: str):
    if name == "ProxyService":
        from mcproxy.service import ProxyService

        return ProxyService
    if name == "makeService":
        from mcproxy.tap import makeService

        return makeService
    raise AttributeError(f"module 'mcproxy' has no attribute {name!r}")
