"""Key hashing and server selection, byte-compatible with memcached's proxy.

Pure arithmetic for ``mcp.pool``: the two key hashers (XXH3-64 for
``mcp.hash_xxhash``, MD5 for ``mcp.dist_ring_hash.hash``), the pool seed, the
jump and ring distributions, and the ``stop``/``tags`` key filters. The ring
``default`` omode and the ``tags`` filter use memcached's fixed (1.6.45)
algorithms, not SEED's broken ones.

:func:`make_selector` precomputes everything a pool needs and returns one
closure, ``select(key) -> index``, which runs for every routed request.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Sequence
from struct import Struct

from xxhash import xxh3_64_intdigest

__all__ = [
    "DEFAULT_OBUCKETS",
    "ERR_BAD_OBUCKETS",
    "ERR_BAD_OMODE",
    "ERR_FILTER_CONF_LENGTH",
    "ERR_FILTER_CONF_MISSING",
    "ERR_OUT_OF_BOUNDS",
    "ERR_UNKNOWN_FILTER",
    "HASHERS",
    "OMODES",
    "KeyFilter",
    "KeyHasher",
    "Selector",
    "build_continuum",
    "jump_hash",
    "make_filter",
    "make_selector",
    "md5_key_hash",
    "pool_seed",
    "xxh3_key_hash",
]

KeyHasher = Callable[[bytes, int], int]
"""``hash(key, pool_seed) -> unsigned int`` (64 or 32 bits)."""
KeyFilter = Callable[[bytes], bytes]
"""``filter(key) -> the part of the key that is hashed``."""
Selector = Callable[[bytes], int]
"""``select(key) -> 0-based backend index``."""
Host = bytes | str
Port = bytes | str | int

DEFAULT_OBUCKETS = 160
OMODES = ("default", "ketama", "twemproxy", "evcache")

ERR_OUT_OF_BOUNDS = "key dist hasher tried to use out of bounds index"
ERR_BAD_OMODE = "ring_hash: bad omode argument"
ERR_BAD_OBUCKETS = "ring_hash: option argument must be a positive integer"
ERR_UNKNOWN_FILTER = "unknown hash filter specified: {name}"
ERR_FILTER_CONF_LENGTH = "hash filter conf must be between 2 and 5 characters"
ERR_FILTER_CONF_MISSING = "hash filter requires 'filter_conf' string"

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_JUMP_MULTIPLIER = 2862933555777941757
_TWO_POW_31 = float(1 << 31)
_LE32 = Struct("<I")
_LE32X4 = Struct("<4I")


def xxh3_key_hash(key: bytes, seed: int) -> int:
    """XXH3-64 of ``key`` with the pool seed (``mcp.hash_xxhash``)."""
    return xxh3_64_intdigest(key, seed)


def md5_key_hash(key: bytes, seed: int) -> int:
    """First 4 bytes of MD5(key), little-endian (``mcp.dist_ring_hash.hash``).

    The seed is ignored, as in memcached.
    """
    return _LE32.unpack_from(hashlib.md5(key).digest())[0]


HASHERS: dict[str, KeyHasher] = {"xxh3": xxh3_key_hash, "md5": md5_key_hash}
"""Key hashers by the name the Lua markers carry."""


def pool_seed(seed: bytes) -> int:
    """The numeric pool seed for an ``mcp.pool{seed = "..."}`` string."""
    return xxh3_64_intdigest(seed, 0)


def jump_hash(h: int, buckets: int) -> int:
    """Lamping-Veach jump consistent hash; -1 when there are no buckets.

    The division is done in IEEE doubles, as in the C original, so the
    result matches it bit for bit.
    """
    b = -1
    j = 0
    while j < buckets:
        b = j
        h = (h * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * (_TWO_POW_31 / ((h >> 33) + 1)))
    return b


def _as_bytes(value: Host | Port) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _check_omode(omode: bytes | str | None) -> str:
    if omode is None:
        return "default"
    if isinstance(omode, bytes):
        omode = omode.decode("latin-1")
    if isinstance(omode, str) and omode in OMODES:
        return omode
    raise ValueError(ERR_BAD_OMODE)


def _check_obuckets(obuckets: object) -> int:
    """A positive integer, converted the way ``lua_tointegerx`` would."""
    if obuckets is None:
        return DEFAULT_OBUCKETS
    count = 0
    if isinstance(obuckets, int) and not isinstance(obuckets, bool):
        count = obuckets
    elif isinstance(obuckets, float) and obuckets.is_integer():
        count = int(obuckets)
    elif isinstance(obuckets, bytes | str):
        try:
            count = int(obuckets)
        except ValueError:
            pass
    if count < 1:
        raise ValueError(ERR_BAD_OBUCKETS)
    return count


def build_continuum(
    servers: Sequence[tuple[Host, Port]],
    omode: bytes | str | None = "default",
    obuckets: object = DEFAULT_OBUCKETS,
) -> list[tuple[int, int]]:
    """The ring-hash continuum: sorted ``(point, 0-based server index)`` pairs.

    ``servers`` are ``(host, port)`` in pool order, host exactly as given to
    ``mcp.backend``. ``omode`` and ``obuckets`` are validated with the Lua
    error texts. The md5 modes make ``obuckets // 4`` digests of 4 points
    each. Equal points are ordered by server index (memcached leaves that
    order unspecified).
    """
    mode = _check_omode(omode)
    count = _check_obuckets(obuckets)
    points: list[tuple[int, int]] = []
    for index, (host, port) in enumerate(servers):
        addr = _as_bytes(host)
        port_b = _as_bytes(port)
        if mode == "default":
            prefix = b"%s:%s-" % (addr, port_b)
            points.extend(
                (xxh3_64_intdigest(b"%s%d" % (prefix, k), 0) & _MASK32, index)
                for k in range(count)
            )
            continue
        if mode == "twemproxy" and port_b == b"11211":
            prefix = addr + b"-"
        elif mode == "evcache":
            prefix = b"%s/%s:%s-" % (addr, addr, port_b)
        else:
            prefix = b"%s:%s-" % (addr, port_b)
        for k in range(count // 4):
            digest = hashlib.md5(b"%s%d" % (prefix, k)).digest()
            points.extend((point, index) for point in _LE32X4.unpack(digest))
    points.sort()
    return points


def make_filter(name: bytes | str, conf: bytes | str | None) -> KeyFilter:
    """The ``stop`` or ``tags`` key filter of ``mcp.pool``, validated.

    ``stop``: hash the key up to the first occurrence of ``conf``.
    ``tags``: hash what lies strictly between the first ``conf[0]`` and the
    next ``conf[1]`` after it. Either falls back to the whole key.
    """
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if name not in ("stop", "tags"):
        raise ValueError(ERR_UNKNOWN_FILTER.format(name=name))
    if isinstance(conf, str):
        conf = conf.encode()
    if not isinstance(conf, bytes):
        raise ValueError(ERR_FILTER_CONF_MISSING)
    if not 2 <= len(conf) <= 5:
        raise ValueError(ERR_FILTER_CONF_LENGTH)
    if name == "stop":
        return _stop_filter(conf)
    return _tags_filter(conf[0:1], conf[1:2])


def _stop_filter(stop: bytes) -> KeyFilter:
    def stop_filter(key: bytes) -> bytes:
        end = key.find(stop)
        return key if end < 0 else key[:end]

    return stop_filter


def _tags_filter(open_: bytes, close: bytes) -> KeyFilter:
    def tags_filter(key: bytes) -> bytes:
        start = key.find(open_)
        if start < 0:
            return key
        end = key.find(close, start + 1)
        return key if end < 0 else key[start + 1 : end]

    return tags_filter


def _no_backend(key: bytes) -> int:
    raise ValueError(ERR_OUT_OF_BOUNDS)


def _resolve_hasher(hasher: str | KeyHasher) -> KeyHasher:
    """The hasher to call; the C function itself for XXH3 (no wrapper call)."""
    if isinstance(hasher, str):
        try:
            hasher = HASHERS[hasher]
        except KeyError:
            raise ValueError(f"unknown key hasher: {hasher}") from None
    return xxh3_64_intdigest if hasher is xxh3_key_hash else hasher


def make_selector(
    dist: str,
    hasher: str | KeyHasher,
    seed: int,
    key_filter: KeyFilter | None,
    servers: Sequence[tuple[Host, Port]],
    *,
    omode: bytes | str | None = "default",
    obuckets: object = DEFAULT_OBUCKETS,
) -> Selector:
    """Build ``select(key) -> 0-based backend index`` for one pool.

    ``dist`` is ``"jump"`` or ``"ring"``; ``hasher`` a name from
    :data:`HASHERS` or a :data:`KeyHasher`; ``seed`` the numeric pool seed
    (:func:`pool_seed`); ``servers`` the pool's ``(host, port)`` in order.
    ``omode``/``obuckets`` only matter for the ring and raise ValueError with
    the Lua error text when invalid. With no servers (or an empty ring) the
    selector raises ValueError(:data:`ERR_OUT_OF_BOUNDS`).
    """
    hash_key = _resolve_hasher(hasher)
    if dist == "jump":
        return _jump_selector(hash_key, seed, key_filter, len(servers))
    if dist == "ring":
        continuum = build_continuum(servers, omode, obuckets)
        return _ring_selector(hash_key, seed, key_filter, continuum)
    raise ValueError(f"unknown key distribution: {dist}")


def _jump_selector(
    hash_key: KeyHasher, seed: int, key_filter: KeyFilter | None, buckets: int
) -> Selector:
    if buckets < 1:
        return _no_backend
    if buckets == 1:
        return lambda key: 0
    # Closure cells are cheaper to load than module globals.
    mask64 = _MASK64
    multiplier = _JUMP_MULTIPLIER
    two_pow_31 = _TWO_POW_31

    def select(key: bytes) -> int:
        if key_filter is not None:
            key = key_filter(key)
        h = hash_key(key, seed)
        b = -1
        j = 0
        while j < buckets:
            b = j
            h = (h * multiplier + 1) & mask64
            j = int((b + 1) * (two_pow_31 / ((h >> 33) + 1)))
        return b

    return select


def _ring_selector(
    hash_key: KeyHasher,
    seed: int,
    key_filter: KeyFilter | None,
    continuum: list[tuple[int, int]],
) -> Selector:
    if not continuum:
        return _no_backend
    points = [point for point, _ in continuum]
    # One extra slot so a hash above every point wraps to the first server.
    indexes = [index for _, index in continuum]
    indexes.append(indexes[0])
    mask32 = _MASK32

    if key_filter is None:

        def select(key: bytes) -> int:
            return indexes[bisect_left(points, hash_key(key, seed) & mask32)]

    else:

        def select(key: bytes) -> int:
            key = key_filter(key)
            return indexes[bisect_left(points, hash_key(key, seed) & mask32)]

    return select
