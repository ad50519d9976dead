"""The embedded cache: memcached 1.6's local item store, in pure Python.

Commands that no route attaches are answered here, byte for byte as a
memcached 1.6.18 server would answer them. :class:`Store` is what the rest
of mcproxy sees; behind it, one module per job:

* :mod:`~mcproxy.cache.items`: items, the LRU, memory accounting, cas,
  time and expiry (memcached's ``items.c``);
* :mod:`~mcproxy.cache.text`: the classic text commands, ``flush_all``,
  ``verbosity`` and ``cache_memlimit``;
* :mod:`~mcproxy.cache.meta` (flags read by
  :mod:`~mcproxy.cache.metaflags`): ``mg ms md ma mn me``;
* :mod:`~mcproxy.cache.tokens` and :mod:`~mcproxy.cache.replies`: how
  memcached splits a line, and what it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mcproxy.cache.items import Items
from mcproxy.cache.meta import MetaCommands
from mcproxy.cache.text import TextCommands
from mcproxy.wire.request import Request


class Store:
    """A memory-bounded LRU cache answering memcached requests.

    ``memory_limit`` bounds the sum of
    :func:`~mcproxy.cache.items.item_size` over the items (memcached's
    ``bytes`` stat); ``item_size_max`` is memcached's ``-I``. ``clock``
    returns unix time in seconds.
    """

    def __init__(self, memory_limit: int = 64 * 2**20,
                 item_size_max: int = 2**20,
                 clock: Callable[[], float] = time.time) -> None:
        self._items = Items(memory_limit, item_size_max, clock)
        self._handlers: dict[int, Callable[[Request], bytes]] = {
            **TextCommands(self._items).handlers(),
            **MetaCommands(self._items).handlers(),
        }

    def __len__(self) -> int:
        return len(self._items)

    @property
    def memory_limit(self) -> int:
        """The bytes the items may take (``cache_memlimit`` changes it)."""
        return self._items.memory_limit

    @property
    def item_size_max(self) -> int:
        """The largest item, in accounted bytes (memcached's ``-I``)."""
        return self._items.item_size_max

    def execute(self, req: Request) -> bytes:
        """The bytes memcached would write to the client for ``req``.

        Storage requests must carry their payload in ``req.value``. Raises
        ValueError for commands the proxy answers itself (``stats``,
        ``version``, ``quit``, ``watch``), which are no cache's.
        """
        handler = self._handlers.get(req.command)
        if handler is None:
            raise ValueError(f"the store does not serve {req!r}")
        self._items.tick()
        return handler(req)

    def stats(self) -> dict[str, int]:
        """memcached's general stats that the store owns, in its order."""
        return self._items.stats()
