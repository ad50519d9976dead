"""Parse a memcached backend's replies, and decide what a client receives.

Pure: no Twisted imports. This is the role memcached's vendored ``mcmc``
plays in its proxy (mcp-api.md section 3.4). Response codes use mcmc's later
numbering (the ``mcp.MCMC_CODE_*`` constants of memcached 1.6.16+).

A backend connection is pipelined. The reply to a single-key request is
one line, one line plus a value (``VA``), or ``VALUE`` + data + ``END``;
the reply to a multi-key get (the keys of client multigets sent together)
is its ``VALUE`` items and one ``END``, read with
:meth:`ResponseReader.read_aligned` (mcproxy.wire.reader). Replies that the
client receives as they came (runs of plain requests) are only framed
(:meth:`ResponseReader.read_raw`). Anything else desynchronises the stream
and is raised as :class:`BackendProtocolError`, whose reason is one of
memcached's backend failure names.

Misses: mcmc gives both the text ``END`` and the meta ``EN`` the code
``MCMC_CODE_END``; there is no separate MISS code, so a miss is
``code == MCMC_CODE_END`` (the two are told apart by ``type``).

``ERROR``, ``CLIENT_ERROR`` and ``SERVER_ERROR`` lines are ordinary replies
(memcached 1.6.20+ cycles the connection after the first two; we keep it,
as SEED did: the proxy only forwards well-formed requests). An unknown
two-letter status passes through as a meta reply, as in mcmc; any other
unknown first word is garbage (SEED passed it through).
"""

from __future__ import annotations

import re

from mcproxy.wire.errors import BACKEND_FAILURE, END
from mcproxy.wire.request import (
    CMD_DECR,
    CMD_DELETE,
    CMD_FLUSH_ALL,
    CMD_INCR,
    CMD_MA,
    CMD_MD,
    CMD_ME,
    CMD_MG,
    CMD_MS,
    CMD_TOUCH,
    CMD_VERBOSITY,
    GET_COMMANDS,
    MAX_VALUE_LENGTH,
    META_COMMANDS,
    STORAGE_COMMANDS,
    Request,
    key_index,
)

# Response codes, numbered as in mcmc.h (memcached 1.6.16+).
MCMC_CODE_STORED = 8
MCMC_CODE_EXISTS = 9
MCMC_CODE_DELETED = 10
MCMC_CODE_TOUCHED = 11
MCMC_CODE_VERSION = 12
MCMC_CODE_NOT_FOUND = 13
MCMC_CODE_NOT_STORED = 14
MCMC_CODE_OK = 15
MCMC_CODE_NOP = 16
MCMC_CODE_END = 17
MCMC_CODE_ERROR = 21
MCMC_CODE_CLIENT_ERROR = 22
MCMC_CODE_SERVER_ERROR = 23
#: The status mcp exports beside the codes (``mcp.MCMC_ERR``).
MCMC_ERR = -1

#: Every name memcached exports to Lua as ``mcp.MCMC_*``, and its value.
MCMC_CODES = {
    name: value for name, value in globals().items()
    if name.startswith("MCMC_CODE_") or name == "MCMC_ERR"
}

# Response types, numbered as in mcmc.h (``type=`` in memcached's logs).
MCMC_RESP_GET = 100
MCMC_RESP_META = 101
MCMC_RESP_STAT = 102
MCMC_RESP_GENERIC = 104
MCMC_RESP_END = 105
MCMC_RESP_VERSION = 106
MCMC_RESP_NUMERIC = 107
MCMC_RESP_ERRMSG = 108
MCMC_RESP_FAIL = 109

# Backend failure reasons (memcached's names, logged as ``error=``).
FAIL_TIMEOUT = "timeout"
FAIL_DISCONNECTED = "disconnected"
FAIL_CONNECTING = "connecting"
FAIL_CONNTIMEOUT = "conntimeout"
FAIL_READVALIDATE = "readvalidate"
FAIL_BADVALIDATE = "badvalidate"
FAIL_PARSING = "parsing"
FAIL_CLOSED = "closedsock"
FAIL_UNHANDLEDRES = "unhandledres"
FAIL_MISSINGEND = "missingend"
FAIL_TRAILINGDATA = "trailingdata"
#: mcproxy's: a reply that cannot answer the request it pairs with.
FAIL_MISMATCH = "mismatch"
# mcproxy's own reasons for requests failed without touching the socket.
FAIL_MARKEDBAD = "markedbad"
FAIL_DEPTH = "depthlimit"

_EMPTY = b""

#: Longest reply line accepted; a longer one means the stream is garbage.
MAX_LINE = 16384

# First token -> (code, type) for every reply that is a single line.
_LINES = {
    b"END": (MCMC_CODE_END, MCMC_RESP_END),
    b"EN": (MCMC_CODE_END, MCMC_RESP_META),
    b"HD": (MCMC_CODE_OK, MCMC_RESP_META),
    b"NF": (MCMC_CODE_NOT_FOUND, MCMC_RESP_META),
    b"NS": (MCMC_CODE_NOT_STORED, MCMC_RESP_META),
    b"EX": (MCMC_CODE_EXISTS, MCMC_RESP_META),
    b"MN": (MCMC_CODE_NOP, MCMC_RESP_META),
    b"ME": (MCMC_CODE_OK, MCMC_RESP_META),
    b"OK": (MCMC_CODE_OK, MCMC_RESP_GENERIC),
    b"STORED": (MCMC_CODE_STORED, MCMC_RESP_GENERIC),
    b"EXISTS": (MCMC_CODE_EXISTS, MCMC_RESP_GENERIC),
    b"DELETED": (MCMC_CODE_DELETED, MCMC_RESP_GENERIC),
    b"TOUCHED": (MCMC_CODE_TOUCHED, MCMC_RESP_GENERIC),
    b"NOT_FOUND": (MCMC_CODE_NOT_FOUND, MCMC_RESP_GENERIC),
    b"NOT_STORED": (MCMC_CODE_NOT_STORED, MCMC_RESP_GENERIC),
    b"ERROR": (MCMC_CODE_ERROR, MCMC_RESP_ERRMSG),
    b"CLIENT_ERROR": (MCMC_CODE_CLIENT_ERROR, MCMC_RESP_ERRMSG),
    b"SERVER_ERROR": (MCMC_CODE_SERVER_ERROR, MCMC_RESP_ERRMSG),
}

#: The same for replies that are exactly the token: the common fast path.
WHOLE_LINES = {token + b"\r\n": known for token, known in _LINES.items()}


class BackendProtocolError(Exception):
    """The backend's byte stream cannot be trusted any more.

    ``reason`` is the failure name the connection is reset with.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        #: what did not match, for the log (FAIL_MISMATCH)
        self.detail = detail


def mismatched(what: str, want: bytes, got: bytes) -> BackendProtocolError:
    """The error for a reply that does not answer its request: the stream
    pairs replies with requests by position, so it is out of step."""
    return BackendProtocolError(FAIL_MISMATCH, f"{what}: {got[:80]!r} for {want[:80]!r}")


class Response:
    """One backend reply, or the failure that stands in for it.

    ``ok`` is False when no reply could be had (backend bad, timed out,
    disconnected, desynchronised); such a response has ``code`` SERVER_ERROR
    and ``reason`` says why. ``line`` is the first line including CRLF;
    ``value`` is the data including its CRLF for ``VALUE``/``VA`` replies,
    else None (the ``END`` after a ``VALUE`` is consumed, not kept).
    ``elapsed`` is set by the backend: microseconds from ``send`` to the
    reply (or failure), including any wait for the connection.
    """

    __slots__ = ("ok", "code", "type", "line", "value", "elapsed", "reason")

    def __init__(self, ok: bool, code: int, type: int, line: bytes,
                 value: bytes | None = None) -> None:
        self.ok = ok
        self.code = code
        self.type = type
        self.line = line
        self.value = value
        self.elapsed = 0
        self.reason: str | None = None

    @classmethod
    def failure(cls, reason: str, line: bytes = BACKEND_FAILURE) -> Response:
        """A response for a request the backend could not answer; ``line``
        is what the client gets for it."""
        res = cls(False, MCMC_CODE_SERVER_ERROR, MCMC_RESP_FAIL, line)
        res.reason = reason
        return res

    @classmethod
    def miss(cls) -> Response:
        """An ``END``: the answer for a key a multi-key get did not find."""
        return cls(True, MCMC_CODE_END, MCMC_RESP_END, END)

    @classmethod
    def of_item(cls, item: bytes) -> Response:
        """The response of one ``VALUE`` item (line and data) of a multi-key
        get's reply (see :meth:`ResponseReader.read_aligned`)."""
        line_length = item.index(b"\n") + 1
        return cls(True, MCMC_CODE_OK, MCMC_RESP_GET, item[:line_length], item[line_length:])

    @property
    def hit(self) -> bool:
        """ok, and not a miss (``END``/``EN``); errors and NOT_FOUND are hits."""
        return self.ok and self.code != MCMC_CODE_END

    @property
    def vlen(self) -> int:
        """Length of the value without its CRLF; 0 without a value."""
        value = self.value
        return 0 if value is None else len(value) - 2

    def __repr__(self) -> str:
        if not self.ok:
            return f"<Response failed {self.reason}>"
        return f"<Response {self.code} {self.line!r} vlen={self.vlen}>"


def _size(digits: bytes) -> int:
    """A value length from a reply line; one no request could ask for is
    garbage (and int() refuses 4300+ digits)."""
    number = digits.lstrip(b"0") or b"0"
    if len(number) > 10 or int(number) > MAX_VALUE_LENGTH:
        raise BackendProtocolError(FAIL_PARSING)
    return int(number)


#: A plain ``VALUE`` line, the bulk of get replies: a key without CR as
#: long as memcached allows, flags and a cas of at most 20 digits, a size
#: below 10 digits (groups: key, size); anything else is ``parse_reply``'s to
#: judge. Possessive repeats never backtrack.
VALUE_LINE = re.compile(rb"VALUE ([^ \r\n]{1,250}+) \d{1,20}+ (\d{1,9}+)(?: \d{1,20}+)?\r\n")

def parse_reply(buf: bytes, pos: int, version: bool,
           multi: bool = False) -> tuple[Response, int] | int:
    """Parse the reply starting at ``buf[pos]``.

    Returns ``(response, end)``, or when the reply is incomplete an int: the
    buffer length needed before it can be complete, or -1 when the line
    itself has not arrived yet. With ``multi`` (the reply to a multi-key
    get) a ``VALUE`` is returned without its ``END``, which follows only
    after the last value.
    """
    eol = buf.find(b"\n", pos)
    if eol < 0:
        if len(buf) - pos > MAX_LINE:
            raise BackendProtocolError(FAIL_PARSING)
        return -1
    if eol - pos > MAX_LINE:  # as if it had arrived in pieces
        raise BackendProtocolError(FAIL_PARSING)
    end = eol + 1
    line = buf[pos:end]
    known = WHOLE_LINES.get(line)
    if known is not None:
        return Response(True, known[0], known[1], line), end
    if eol - pos < 2 or buf[eol - 1] != 13:
        raise BackendProtocolError(FAIL_PARSING)

    if line.startswith(b"VALUE "):
        plain = VALUE_LINE.match(line)
        if plain is not None:  # most often: one match makes the checks below
            size = plain[2]
        else:
            fields = line[6:-2].split(b" ")
            nfields = len(fields)
            if not ((nfields == 3 or (nfields == 4 and fields[3].isdigit()))
                    and fields[0] and fields[1].isdigit() and fields[2].isdigit()):
                raise BackendProtocolError(FAIL_PARSING)
            size = fields[2]
        # Nine digits are always within MAX_VALUE_LENGTH.
        vend = end + (int(size) if len(size) <= 9 else _size(size)) + 2
        total = vend + 5
        have = len(buf)
        if have < vend:
            return vend
        if not buf.startswith(b"\r\n", vend - 2):
            raise BackendProtocolError(FAIL_PARSING)
        if multi:
            return Response(True, MCMC_CODE_OK, MCMC_RESP_GET, line,
                            buf[end:vend]), vend
        if have < total:
            if not END.startswith(buf[vend:]):
                raise BackendProtocolError(FAIL_MISSINGEND)
            return have + 1
        if not buf.startswith(END, vend):
            raise BackendProtocolError(FAIL_MISSINGEND)
        return Response(True, MCMC_CODE_OK, MCMC_RESP_GET, line,
                        buf[end:vend]), total

    if line.startswith(b"VA "):
        size = line[3:-2].partition(b" ")[0]
        if not size.isdigit():
            raise BackendProtocolError(FAIL_PARSING)
        vend = end + _size(size) + 2
        if len(buf) < vend:
            return vend
        if not buf.startswith(b"\r\n", vend - 2):
            raise BackendProtocolError(FAIL_PARSING)
        return Response(True, MCMC_CODE_OK, MCMC_RESP_META, line,
                        buf[end:vend]), vend

    if 48 <= line[0] <= 57:
        return Response(True, MCMC_CODE_OK, MCMC_RESP_NUMERIC, line), end
    space = line.find(b" ")
    token = line[:space] if space >= 0 else line[:-2]
    known = _LINES.get(token)
    if known is not None:
        return Response(True, known[0], known[1], line), end
    if token == b"VERSION" and version:
        return Response(True, MCMC_CODE_VERSION, MCMC_RESP_VERSION, line), end
    if token == b"VERSION" or token == b"STAT":
        raise BackendProtocolError(FAIL_UNHANDLEDRES)
    if len(token) == 2 and token != b"VA":
        # An unknown meta status: self-contained, passed through (mcmc).
        return Response(True, MCMC_CODE_OK, MCMC_RESP_META, line), end
    raise BackendProtocolError(FAIL_PARSING)


def parse_response(buf: bytes | bytearray, pos: int = 0,
                   version: bool = False) -> tuple[Response, int] | None:
    """The next complete reply in ``buf`` from ``pos`` and the offset after it.

    None if the reply is incomplete. ``version=True`` accepts a ``VERSION``
    line (the reply to the backend's own validation request); otherwise
    ``VERSION`` and ``STAT`` are unhandled replies. Raises
    :class:`BackendProtocolError` for anything else a backend must not send.
    A bytearray is copied from ``pos`` on each call; for streaming use
    :class:`ResponseReader`, which neither copies nor re-scans.
    """
    if buf.__class__ is not bytes:
        result = parse_reply(bytes(buf[pos:]), 0, version)
        if result.__class__ is int:
            return None
        return result[0], result[1] + pos
    result = parse_reply(buf, pos, version)
    if result.__class__ is int:
        return None
    return result


#: The first token of each reply a command may get besides error lines.
_REPLIES = {
    **dict.fromkeys(STORAGE_COMMANDS, frozenset((b"STORED", b"NOT_STORED", b"EXISTS",
                                                 b"NOT_FOUND"))),
    CMD_DELETE: frozenset((b"DELETED", b"NOT_FOUND")),
    CMD_TOUCH: frozenset((b"TOUCHED", b"NOT_FOUND")),
    CMD_INCR: frozenset((b"NOT_FOUND",)),
    CMD_DECR: frozenset((b"NOT_FOUND",)),
    CMD_MG: frozenset((b"VA", b"HD", b"EN")),
    CMD_MS: frozenset((b"HD", b"NS", b"EX", b"NF")),
    CMD_MD: frozenset((b"HD", b"NF", b"EX")),
    CMD_MA: frozenset((b"HD", b"NF", b"NS", b"EX", b"VA")),
    CMD_ME: frozenset((b"ME", b"EN")),
    CMD_FLUSH_ALL: frozenset((b"OK",)),
    CMD_VERBOSITY: frozenset((b"OK",)),
}


def value_key(line: bytes) -> bytes:
    """The key of a ``VALUE <key> <flags> <bytes>`` line."""
    return line[6:line.find(b" ", 6)]


def check_reply(req: Request, res: Response) -> None:
    """Raise FAIL_MISMATCH unless ``res`` can answer ``req``: a ``VALUE``
    must carry the requested key, a reply must be of a kind the command
    gets (error lines answer anything), and a meta reply's ``O`` opaque
    and ``k`` key flags must be the request's."""
    rtype = res.type
    if rtype == MCMC_RESP_ERRMSG:
        return
    command = req.command
    line = res.line
    if command in GET_COMMANDS:
        if rtype == MCMC_RESP_GET:
            if value_key(line) != req.key:
                raise mismatched("VALUE of another key", req.key, line)
        elif rtype != MCMC_RESP_END:
            raise mismatched("reply of the wrong kind", req.line, line)
        return
    replies = _REPLIES.get(command)
    if replies is None:
        return
    if rtype == MCMC_RESP_NUMERIC:
        if command != CMD_INCR and command != CMD_DECR:
            raise mismatched("reply of the wrong kind", req.line, line)
        return
    space = line.find(b" ")
    if (line[:space] if space >= 0 else line[:-2]) not in replies:
        raise mismatched("reply of the wrong kind", req.line, line)
    if space < 0:
        return
    if command == CMD_ME:
        if line[:3] == b"ME " and line[3:].partition(b" ")[0] != req.key:
            raise mismatched("debug line of another key", req.key, line)
    elif command in META_COMMANDS:
        _check_meta_flags(req, line)


def _check_meta_flags(req: Request, line: bytes) -> None:
    """A meta reply carries its request's opaque (``O``) and, with the
    ``k`` flag, its key: any other is another request's reply."""
    first_flag = 3 if req.command == CMD_MS else 2
    opaque = key = None
    binary = False
    for flag in req.tokens[first_flag:]:
        if flag[:1] == b"O":
            opaque = flag
        elif flag[:1] == b"k":  # memcached reads a flag by its first byte
            key = b"k" + req.key
        elif flag[:1] == b"b":
            # memcached gives a base64 key back encoded or not, as it was stored.
            binary = True
    for token in line[:-2].split(b" ")[1:]:
        if token[:1] == b"O" and token != opaque:
            raise mismatched("opaque of another request", req.line, line)
        if token[:1] == b"k" and token != key and not binary:
            raise mismatched("key of another request", req.line, line)


def _quieted(command: int, res: Response) -> bool:
    """Whether meta quiet mode (``q``) silences ``res``, as memcached does:
    a miss of ``mg`` (its hit, ``HD`` or ``VA``, is sent), the success of
    ``ms`` and ``md`` (``HD``), and every success of ``ma`` (``HD``, or
    ``VA`` with its number); a failure is always sent."""
    head = res.line[:2]
    if command == CMD_MG:
        return res.code == MCMC_CODE_END
    if command == CMD_MA:
        return head == b"HD" or head == b"VA"
    return head == b"HD"


def client_bytes(res: Response, req: Request) -> bytes:
    """What the client receives for ``res`` answering ``req``.

    A failure is always sent, also for noreply and meta quiet requests: its
    line (``SERVER_ERROR backend failure``, or a broadcast's count). A
    ``VALUE`` hit gets the proxy's own ``END``, a miss is ``END`` alone;
    inside a split multiget both are :func:`key_reply`'s. noreply
    suppresses every backend reply; meta quiet what memcached's does
    (:func:`_quieted`).
    """
    if not res.ok:
        return res.line
    if req.noreply:
        return _EMPTY
    rtype = res.type
    if rtype == MCMC_RESP_GET or rtype == MCMC_RESP_END:
        if req.multiget:
            return key_reply(res)
        return END if rtype == MCMC_RESP_END else _EMPTY.join((res.line, res.value, END))
    if req.quiet and rtype == MCMC_RESP_META and _quieted(req.command, res):
        return _EMPTY
    value = res.value
    return res.line if value is None else res.line + value


def string_reply(text: bytes, req: Request) -> bytes:
    """What the client receives for a route's string answer ``text`` to
    ``req``: the string as it is, but for a key of a split multiget, whose
    END is the proxy's own after the last key: there ``END`` alone is a
    miss (nothing) and a ``VALUE ... END`` answer loses its END, as
    :func:`key_reply` treats a Response. Any other string goes as it is."""
    if req.multiget and text.endswith(END) and (len(text) == len(END) or
                                                text.startswith(b"VALUE ")):
        return text[:-len(END)]
    return text


def key_reply(res: Response) -> bytes:
    """What one key of a client multiget gets for ``res``: a hit's ``VALUE``
    line and data, nothing for a miss (``END``; the multiget's one ``END``
    follows its last key), else the reply itself: an error line, or a
    failure's line. Whatever route the key took (split and routed alone,
    merged with its neighbours, batched, in a run), this is its answer."""
    if res.type == MCMC_RESP_END:
        return _EMPTY
    value = res.value
    return res.line if value is None else res.line + value


def every_key(line: bytes, count: int) -> bytes:
    """What a client multiget of ``count`` keys gets when one line answers
    all of them (an error line, a failure): :func:`key_reply` of that line
    for each key, then the ``END``."""
    return line * count + END


# -- Flags of replies, for routes (res:flag_blank, r:match_res) ---------------

#: What ends a flag token that flag_blank() blanks (C's isspace).
_SPACES = frozenset(b" \t\n\v\f\r")
#: Most reply tokens memcached's proxy reads flags from (mcmc's 24, less
#: the code).
_REPLY_FLAG_TOKENS = 23


def raw_reply(res: Response) -> bytes | None:
    """``res:raw_string()``: the reply as the backend sent it (a ``VALUE``
    with its ``END``); None for a failure."""
    if not res.ok:
        return None
    if res.type == MCMC_RESP_GET and res.value is not None:
        return _EMPTY.join((res.line, res.value, END))
    return res.line if res.value is None else res.line + res.value


def blank_flag(res: Response, letter: int) -> bool:
    """``res:flag_blank(f)``: overwrite with spaces the first flag token of
    ``letter`` in a meta reply's flags (after the code, and a ``VA``'s
    size), in place, as memcached's proxy does; False if there is none."""
    if not res.ok or res.type != MCMC_RESP_META:
        return False
    line = res.line
    end = len(line) - 2
    start = 0
    for _ in range(2 if line[:2] == b"VA" else 1):
        start = line.find(b" ", start, end) + 1
        if start == 0:
            return False
    pos = start
    while pos < end:
        if line[pos] == letter and (pos == start or line[pos - 1] == 32):
            stop = pos
            while stop < end and line[stop] not in _SPACES:
                stop += 1
            res.line = line[:pos] + b" " * (stop - pos) + line[stop:]
            return True
        pos += 1
    return False


def _reply_flag(tokens: list[bytes], letter: int) -> bytes | None:
    for token in tokens:
        if token[0] == letter:
            return token[1:]
    return None


def match_reply(req: Request, res: Response) -> tuple[bool, str | None]:
    """``r:match_res(res)``: whether the reply's ``k`` flag carries the
    request's key and its ``O`` the request's opaque, as memcached's proxy
    checks them: (False, why) on a mismatch; (False, None) when there was
    nothing to compare (no ``k`` in the reply, no ``O`` value in the
    request); the reply's tokens after the first are read as flags, of any
    reply."""
    if not res.ok:
        return False, "failed to parse response"
    tokens = [t for t in res.line[:-2].split(b" ")[1:] if t][:_REPLY_FLAG_TOKENS]
    matched = False
    key = _reply_flag(tokens, 107)  # k
    if key is not None:
        if key != req.key:
            return False, "key in response does not match request key"
        matched = True
    opaque = None
    for token in req.tokens[3 if req.command == CMD_MS else key_index(req) + 1:]:
        if token[:1] == b"O":
            opaque = token[1:] or None
            break
    if opaque is not None:
        theirs = _reply_flag(tokens, 79)  # O
        if theirs is None:
            return False, "opaque in request but not in response"
        if theirs != opaque:
            return False, "request opaque does not match response opaque"
        matched = True
    return matched, None
