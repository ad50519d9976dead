"""memcached's meta commands, answered from the embedded cache.

mg, ms, md, ma, mn and me, with their flags, as memcached 1.6.18's
``proto_text.c`` answers them: :func:`~mcproxy.cache.metaflags.preparse`
reads the flags that change what a command does, and each command then
walks its flags again, in the order given, to write its reply (so ``O``,
``k`` and the returned fields come back in request order).
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from mcproxy.cache.items import (
    DELTA_CAS_MISMATCH,
    DELTA_NON_NUMERIC,
    DELTA_NOT_FOUND,
    DELTA_OK,
    FETCHED,
    KEY_BINARY,
    STALE,
    STORED,
    TOKEN_SENT,
    Item,
    Items,
    item_size,
)
from mcproxy.cache.metaflags import MetaFlags, b64decode_key, key_token, preparse
from mcproxy.cache.replies import (
    BAD_DATA_CHUNK,
    BAD_FORMAT,
    CRLF,
    EN,
    ERROR,
    EX,
    HD,
    INVALID_MA_MODE,
    INVALID_MS_MODE,
    INVALID_OR_DUPLICATE_FLAG,
    ME_LINE,
    META_FLAGS_TOO_LONG,
    MG_FLAGS_TOO_LONG,
    MN,
    MS_CODES,
    NF,
    NO_ROOM,
    NON_NUMERIC,
    OPAQUE_TOO_LONG,
    OUT_OF_MEMORY_VIVIFY,
    VA,
)
from mcproxy.cache.tokens import KEY_MAX_LENGTH, ntokens, tokenize
from mcproxy.wire.numbers import INT_MAX, U32, strtol32
from mcproxy.wire.request import (
    CMD_ADD,
    CMD_APPEND,
    CMD_CAS,
    CMD_MA,
    CMD_MD,
    CMD_ME,
    CMD_MG,
    CMD_MN,
    CMD_MS,
    CMD_PREPEND,
    CMD_REPLACE,
    CMD_SET,
    Request,
)

#: Meta commands with more tokens than this are refused.
META_MAX_TOKENS = 20
META_MAX_OPAQUE_LENGTH = 32

#: ms's mode (M flag) as the storage command it is: E A P R S.
_MS_MODES = {None: CMD_SET, 69: CMD_ADD, 65: CMD_APPEND, 80: CMD_PREPEND,
             82: CMD_REPLACE, 83: CMD_SET}
#: ma's mode as incr (True) or decr: I + D -.
_MA_MODES = {None: True, 73: True, 43: True, 68: False, 45: False}


def _meta_start(tokens: list[bytes], too_long: bytes) -> bytes | None:
    """The checks every meta command starts with; None when passed."""
    count = ntokens(tokens)
    if count < 3:
        return ERROR
    if len(tokens[1]) > KEY_MAX_LENGTH:
        return BAD_FORMAT
    if count > META_MAX_TOKENS:
        return too_long
    return None


class MetaCommands:
    """The meta commands over ``items``; :meth:`handlers` dispatches them."""

    def __init__(self, items: Items) -> None:
        self.items = items

    def handlers(self) -> dict[int, Callable[[Request], bytes]]:
        """The handler of each command, by command number."""
        return {CMD_MG: self.mg, CMD_MS: self.ms, CMD_MD: self.md,
                CMD_MA: self.ma, CMD_MN: self.mn, CMD_ME: self.me}

    def mg(self, req: Request) -> bytes:
        """Meta get: HD or VA with the requested fields, EN on a miss."""
        items = self.items
        tokens = tokenize(req.line)
        error = _meta_start(tokens, MG_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = MetaFlags(tokens[1])
        error = preparse(tokens, 2, of, items.expiry)
        if error is not None:
            return error
        key = of.key
        counters = items.counters
        it = items.lookup(key)
        if it is not None and not of.locked and not of.no_update:
            items.bump(key, it)
        created = False
        if it is None and of.vivify:
            it = Item(key, CRLF, 0, 0)
            if it.size <= items.memory_limit:
                items.link(key, it)
                created = True
            else:
                it = None
        if it is None:
            counters["cmd_get"] += 1
            counters["get_misses"] += 1
            out = [EN]
            for token in tokens[2:]:
                flag = token[0]
                if flag == 79:  # O
                    if len(token) > META_MAX_OPAQUE_LENGTH:
                        return OPAQUE_TOO_LONG
                    out.append(b" " + token)
                elif flag == 107:  # k
                    out.append(key_token(key, of.binary))
            if of.quiet:
                return b""
            out.append(CRLF)
            return b"".join(out)

        now = items.now
        out = [VA % (len(it.value) - 2) if of.value else HD]
        won = ttl_set = False
        for token in tokens[2:]:
            flag = token[0]
            if flag == 84:  # T
                ttl_set = True
                it.exptime = of.exptime
            elif flag == 78:  # N
                if created:
                    it.exptime = of.autoviv_exptime
                    won = True
            elif flag == 82:  # R
                if (not it.bits & TOKEN_SENT and not created and it.exptime
                        and it.exptime < of.recache_time):
                    won = True
            elif flag == 115:  # s
                out.append(b" s%d" % (len(it.value) - 2))
            elif flag == 116:  # t
                out.append(b" t%d" % ((it.exptime - now) & U32)
                           if it.exptime else b" t-1")
            elif flag == 99:  # c
                out.append(b" c%d" % it.cas)
            elif flag == 102:  # f
                out.append(b" f%d" % it.flags)
            elif flag == 108:  # l
                out.append(b" l%d" % ((now - it.time) & U32))
            elif flag == 104:  # h
                out.append(b" h1" if it.bits & FETCHED else b" h0")
            elif flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                out.append(b" " + token)
            elif flag == 107:  # k
                out.append(key_token(key, bool(it.bits & KEY_BINARY)))
        if it.bits & TOKEN_SENT:
            out.append(b" Z")
        if it.bits & STALE:
            out.append(b" X")
            if not it.bits & TOKEN_SENT:
                won = True
        if won:
            out.append(b" W")
            it.bits |= TOKEN_SENT
        out.append(CRLF)
        if of.value:
            out.append(it.value)
        if of.locked and not of.no_update:
            items.bump(key, it)
        if ttl_set:
            counters["cmd_touch"] += 1
            counters["touch_hits"] += 1
        else:
            counters["cmd_get"] += 1
            counters["get_hits"] += 1
        return b"".join(out)

    def ms(self, req: Request) -> bytes:
        """Meta set: HD/NS/EX/NF, with the requested O, k and c fields."""
        items = self.items
        tokens = tokenize(req.line)
        error = _meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        if ntokens(tokens) == 3:
            return BAD_FORMAT
        vlen = strtol32(tokens[2])
        if vlen is None or vlen < 0 or vlen > INT_MAX - 2:
            return BAD_FORMAT
        of = MetaFlags(tokens[1])
        error = preparse(tokens, 3, of, items.expiry)
        if error is not None:
            return error
        key = of.key
        echo = []
        error = None
        for token in tokens[3:]:
            flag = token[0]
            if flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    error = OPAQUE_TOO_LONG
                else:
                    echo.append(token)
            elif flag == 107 or flag == 99:  # k c
                echo.append(token[:1])
        comm = _MS_MODES.get(of.mode)
        if comm is None:
            return INVALID_MS_MODE
        if of.has_cas and (comm == CMD_SET or comm == CMD_REPLACE):
            comm = CMD_CAS
        if error is not None:
            return error
        reason = items.fits(item_size(len(key), of.client_flags, vlen + 2))
        if reason is not None:
            old = items.lookup(key)
            if old is not None:
                items.unlink(key, old)
            return NO_ROOM[reason]
        items.counters["cmd_set"] += 1
        value = req.value
        if value is None or len(value) != vlen + 2 or value[-2:] != CRLF:
            return BAD_DATA_CHUNK
        it = Item(key, value, of.client_flags, of.exptime, of.req_cas,
                  KEY_BINARY if of.binary else 0)
        result, cas = items.store(key, it, comm, of.set_stale and comm == CMD_CAS)
        if result == STORED and of.quiet:
            return b""
        out = [MS_CODES[result]]
        for token in echo:
            if token == b"k":
                out.append(key_token(key, of.binary))
            elif token == b"c":
                out.append(b" c%d" % cas)
            else:
                out.append(b" " + token)
        out.append(CRLF)
        return b"".join(out)

    def md(self, req: Request) -> bytes:
        """Meta delete: HD, NF or EX; I marks stale instead of deleting."""
        items = self.items
        tokens = tokenize(req.line)
        error = _meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = MetaFlags(tokens[1])
        if preparse(tokens, 2, of, items.expiry) is not None:
            return INVALID_OR_DUPLICATE_FLAG
        key = of.key
        echo = []
        for token in tokens[2:]:
            flag = token[0]
            if flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                echo.append(b" " + token)
            elif flag == 107:  # k
                echo.append(key_token(key, of.binary))
        counters = items.counters
        it = items.lookup(key)
        if it is None:
            counters["delete_misses"] += 1
            code = NF
        elif of.has_cas and it.cas != of.req_cas:
            counters["delete_misses"] += 1
            code = EX
        else:
            if of.set_stale:
                if of.new_ttl:
                    it.exptime = of.exptime
                it.bits = (it.bits | STALE) & ~TOKEN_SENT
                it.cas = items.next_cas()
            else:
                counters["delete_hits"] += 1
                items.unlink(key, it)
            if of.quiet:
                return b""
            code = HD
        return code + b"".join(echo) + CRLF

    def ma(self, req: Request) -> bytes:
        """Meta arithmetic: HD or VA with the new number, NF, EX."""
        items = self.items
        tokens = tokenize(req.line)
        error = _meta_start(tokens, META_FLAGS_TOO_LONG)
        if error is not None:
            return error
        of = MetaFlags(tokens[1])
        if preparse(tokens, 2, of, items.expiry) is not None:
            return INVALID_OR_DUPLICATE_FLAG
        key = of.key
        incr = _MA_MODES.get(of.mode)
        if incr is None:
            return INVALID_MA_MODE
        result, number, it = items.add_delta(key, incr, of.delta, of.req_cas)
        created = False
        code = HD
        if result == DELTA_NON_NUMERIC:
            return NON_NUMERIC
        if result == DELTA_NOT_FOUND:
            if of.vivify:
                number = b"%d" % of.initial
                it = Item(key, number + CRLF, 0, 0)
                if it.size > items.memory_limit:
                    return OUT_OF_MEMORY_VIVIFY
                items.store(key, it, CMD_ADD, False)
                created = True
            else:
                items.counters["incr_misses" if incr else "decr_misses"] += 1
                code = NF
        elif result == DELTA_CAS_MISMATCH:
            code = EX
        if it is None:
            out = [code]
            for token in tokens[2:]:
                flag = token[0]
                if flag == 79:  # O
                    if len(token) > META_MAX_OPAQUE_LENGTH:
                        return OPAQUE_TOO_LONG
                    out.append(b" " + token)
                elif flag == 107:  # k
                    out.append(key_token(key, of.binary))
            out.append(CRLF)
            return b"".join(out)
        out = [VA % len(number) if of.value else HD]
        for token in tokens[2:]:
            flag = token[0]
            if flag == 99:  # c
                out.append(b" c%d" % it.cas)
            elif flag == 116:  # t
                out.append(b" t%d" % ((it.exptime - items.now) & U32)
                           if it.exptime else b" t-1")
            elif flag == 84:  # T
                it.exptime = of.exptime
            elif flag == 78:  # N
                if created:
                    it.exptime = of.autoviv_exptime
            elif flag == 79:  # O
                if len(token) > META_MAX_OPAQUE_LENGTH:
                    return OPAQUE_TOO_LONG
                out.append(b" " + token)
            elif flag == 107:  # k
                out.append(key_token(key, of.binary))
        if of.quiet and result == DELTA_OK:
            return b""
        if of.value:
            out.append(CRLF)
            out.append(number)
        out.append(CRLF)
        return b"".join(out)

    def mn(self, req: Request) -> bytes:
        """Meta no-op: memcached flushes its pending replies, then MN."""
        return MN

    def me(self, req: Request) -> bytes:
        """Meta debug: one line describing the item, or EN."""
        items = self.items
        tokens = tokenize(req.line)
        if ntokens(tokens) < 3 or len(tokens[1]) > KEY_MAX_LENGTH:
            return BAD_FORMAT
        key = tokens[1]
        if len(tokens) >= 3 and tokens[2] == b"b":
            key = b64decode_key(key)
            if key is None:
                return BAD_FORMAT
        it = items.lookup(key)
        items.counters["cmd_meta"] += 1
        if it is None:
            return EN + CRLF
        now = items.now
        if it.exptime:
            exp = (now - it.exptime) & U32
            exp = exp - 2**32 if exp > INT_MAX else exp
        else:
            exp = -1
        shown = base64.b64encode(key) if it.bits & KEY_BINARY else key
        return ME_LINE % (shown, exp, (now - it.time) & U32, it.cas,
                          b"yes" if it.bits & FETCHED else b"no",
                          items.slab_class(it.size), it.size)
