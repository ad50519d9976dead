"""The flags of a meta request, read as memcached's preparse reads them.

memcached reads a meta command's flags twice: once up front
(``_meta_flag_preparse``), for the flags that change what the command
does, and once while it writes the reply, for the ones echoed back.
:func:`preparse` is the first reading, with its order of errors;
:mod:`mcproxy.cache.meta` does the second. Base64 keys (``b``) are
decoded and encoded here as memcached does.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from mcproxy.cache.replies import (
    BAD_FORMAT,
    BAD_M_TOKEN,
    BAD_TOKEN,
    DUPLICATE_FLAG,
    INVALID_DELTA,
    INVALID_FLAG,
    INVALID_INITIAL,
    KEY_DECODE_ERROR,
)
from mcproxy.wire.numbers import strtol32, strtoul32, strtoull

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_INVALID = 0x80
_B64_TABLE = [_B64_INVALID] * 256
for _i, _c in enumerate(_B64_ALPHABET):
    _B64_TABLE[_c] = _i
_B64_TABLE[61] = 0  # "="


def b64decode_key(src: bytes) -> bytes | None:
    """Decode a base64 key as memcached does (None where it fails).

    Bytes outside the alphabet are skipped; the rest must come in groups
    of four; decoding stops after the first group holding padding.
    """
    table = _B64_TABLE
    count = sum(1 for c in src if table[c] != _B64_INVALID)
    if count == 0 or count % 4:
        return None
    out = bytearray()
    block: list[int] = []
    pad = 0
    for c in src:
        v = table[c]
        if v == _B64_INVALID:
            continue
        if c == 61:
            pad += 1
        block.append(v)
        if len(block) == 4:
            out += bytes(((block[0] << 2 | block[1] >> 4) & 255,
                          (block[1] << 4 | block[2] >> 2) & 255,
                          (block[2] << 6 | block[3]) & 255))
            block = []
            if pad:
                if pad > 2:
                    return None
                del out[-pad:]
                break
    return bytes(out) or None


def key_token(key: bytes, binary: bool) -> bytes:
    """A meta reply's ``k`` flag: the key, base64 plus ``b`` if binary."""
    if binary:
        return b" k" + base64.b64encode(key) + b" b"
    return b" k" + key


class MetaFlags:
    """The flags of one meta request, as memcached's preparse reads them.

    Expiry times (``exptime``, ``autoviv_exptime``, ``recache_time``) are
    in store seconds; ``mode`` is the byte after ``M``, if given.
    """

    __slots__ = ("key", "binary", "quiet", "locked", "vivify", "value",
                 "no_update", "set_stale", "has_cas", "new_ttl", "mode",
                 "exptime", "autoviv_exptime", "recache_time",
                 "client_flags", "req_cas", "delta", "initial")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.binary = self.quiet = self.locked = self.vivify = False
        self.value = self.no_update = self.set_stale = False
        self.has_cas = self.new_ttl = False
        self.mode: int | None = None
        self.exptime = self.autoviv_exptime = self.recache_time = 0
        self.client_flags = self.req_cas = self.initial = 0
        self.delta = 1


def preparse(tokens: list[bytes], start: int, of: MetaFlags,
             expiry: Callable[[int], int]) -> bytes | None:
    """Read the flags from ``tokens[start:]`` into ``of``.

    ``expiry`` turns an exptime argument into store seconds. Returns None,
    or the error memcached's _meta_flag_preparse gives: an unknown or
    repeated flag stops at once, a bad value is reported after the rest
    were read (the last bad value's error wins).
    """
    seen = set()
    error = None
    bad = False
    for token in tokens[start:]:
        flag = token[0]
        if flag >= 127 or flag in seen:
            return DUPLICATE_FLAG
        seen.add(flag)
        arg = token[1:]
        if flag == 98:  # b
            key = b64decode_key(of.key)
            if key is None:
                error = KEY_DECODE_ERROR
            else:
                of.key = key
            of.binary = True
        elif flag == 78:  # N
            of.locked = of.vivify = True
            value = strtol32(arg)
            if value is None:
                error = BAD_TOKEN
            else:
                of.autoviv_exptime = expiry(value)
        elif flag == 84:  # T
            of.locked = True
            value = strtol32(arg)
            if value is None:
                error = BAD_TOKEN
            else:
                of.exptime = expiry(value)
                of.new_ttl = True
        elif flag == 82:  # R
            of.locked = True
            value = strtol32(arg)
            if value is None:
                error = BAD_TOKEN
            else:
                of.recache_time = expiry(value)
        elif flag == 108 or flag == 104:  # l h
            of.locked = True
        elif flag == 118:  # v
            of.value = True
        elif flag == 117:  # u
            of.no_update = True
        elif flag == 113:  # q
            of.quiet = True
        elif flag == 70:  # F: a bad value keeps the previous error
            value = strtoul32(arg)
            if value is None:
                bad = True
            else:
                of.client_flags = value
        elif flag == 67:  # C
            value = strtoull(arg)
            if value is None:
                error = BAD_TOKEN
            else:
                of.req_cas = value
                of.has_cas = True
        elif flag == 77:  # M
            if len(token) != 2:
                error = BAD_M_TOKEN
            else:
                of.mode = token[1]
        elif flag == 74:  # J
            value = strtoull(arg)
            if value is None:
                error = INVALID_INITIAL
            else:
                of.initial = value
        elif flag == 68:  # D
            value = strtoull(arg)
            if value is None:
                error = INVALID_DELTA
            else:
                of.delta = value
        elif flag == 73:  # I
            of.set_stale = True
        elif flag not in b"OPLkstcf":
            return INVALID_FLAG
    if error is None and bad:
        return BAD_FORMAT
    return error
