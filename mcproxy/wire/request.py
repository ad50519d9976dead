"""Tokenise and classify one memcached text-protocol request line.

Pure: no Twisted imports. The rules are those of memcached's proxy request
parser (mcp-api.md section 2.1): commands are recognised by exact lower-case
spelling, tokens are separated by spaces, a per-command cap limits how many
tokens are indexed (the last indexed token then runs to the end of the line),
and a line must end in ``\r\n`` (a line that ends in a bare ``\n`` reaches
the parser so only under 1.6.15's wire behaviour, and is refused; under
1.6.45's the protocol re-frames it with ``\r\n`` first: mcproxy.wire.behaviour).

A request is forwarded on a connection it shares with other clients, whose
replies are paired with requests by position: it must be one that memcached
reads as exactly one command with the same key and payload length. So
beyond what memcached's proxy refuses, this parser refuses, with the error
memcached itself would answer (:class:`ParseError`): a NUL anywhere in the
line (memcached reads up to it), a key over 250 bytes (every command), a
``get`` without a key, a storage line with the wrong token count or flags,
exptime or cas that memcached's ``safe_strto*`` do not read
(:mod:`mcproxy.wire.numbers`), and an ``ms`` of more than 16 flags.
``noreply`` is the exact last token of the commands that take it. These
rules live here alone; the fast paths take a subset of what they accept.
"""

from __future__ import annotations

import re
from itertools import accumulate

from mcproxy.wire.errors import (
    BAD_COMMAND_LINE,
    ERROR,
    OPTIONS_TOO_LONG,
    PARSING_REQUEST,
    REQUEST_TOO_LONG,
)
from mcproxy.wire.numbers import strtol, strtoull

try:  # compiled (setup.py builds it where a compiler is): scan_plain's result, faster
    from mcproxy.wire._frames import scan_plain as scan_compiled
except ImportError:
    scan_compiled = None

# Command ids, exactly as memcached's proxy numbers them (mcp.CMD_*).
CMD_MG = 1
CMD_MS = 2
CMD_MD = 3
CMD_MN = 4
CMD_MA = 5
CMD_ME = 6
CMD_GET = 7
CMD_GAT = 8
CMD_SET = 9
CMD_ADD = 10
CMD_CAS = 11
CMD_GETS = 12
CMD_GATS = 13
CMD_INCR = 14
CMD_DECR = 15
CMD_TOUCH = 16
CMD_APPEND = 17
CMD_DELETE = 18
CMD_REPLACE = 19
CMD_PREPEND = 20
CMD_END_STORAGE = 21
CMD_QUIT = 22
CMD_STATS = 23
CMD_SLABS = 24
CMD_WATCH = 25
CMD_LRU = 26
CMD_VERSION = 27
CMD_SHUTDOWN = 28
CMD_EXTSTORE = 29
CMD_FLUSH_ALL = 30
CMD_VERBOSITY = 31
CMD_LRU_CRAWLER = 32
CMD_REFRESH_CERTS = 33
CMD_CACHE_MEMLIMIT = 34
CMD_ANY = 36
CMD_ANY_STORAGE = 37

#: Every exported ``mcp.CMD_*`` name and its id.
COMMAND_CONSTANTS = {
    name: value for name, value in globals().items() if name.startswith("CMD_")
}

#: The commands the parser recognises, by their wire spelling.
COMMANDS = {
    b"mg": CMD_MG, b"ms": CMD_MS, b"md": CMD_MD, b"mn": CMD_MN, b"ma": CMD_MA,
    b"me": CMD_ME, b"get": CMD_GET, b"gat": CMD_GAT, b"set": CMD_SET,
    b"add": CMD_ADD, b"cas": CMD_CAS, b"gets": CMD_GETS, b"gats": CMD_GATS,
    b"incr": CMD_INCR, b"decr": CMD_DECR, b"touch": CMD_TOUCH,
    b"append": CMD_APPEND, b"delete": CMD_DELETE, b"replace": CMD_REPLACE,
    b"prepend": CMD_PREPEND, b"quit": CMD_QUIT, b"stats": CMD_STATS,
    b"watch": CMD_WATCH, b"version": CMD_VERSION,
    b"flush_all": CMD_FLUSH_ALL, b"verbosity": CMD_VERBOSITY,
    b"cache_memlimit": CMD_CACHE_MEMLIMIT,
}

#: Commands memcached knows and the proxy does not serve: answered
#: ``SERVER_ERROR parsing request``, memcached's proxy's answer, where a
#: command nobody knows gets memcached's ``ERROR`` (see README, "Differences
#: from memcached").
NOT_SERVED = frozenset((b"slabs", b"lru", b"shutdown", b"extstore", b"lru_crawler",
                        b"refresh_certs"))

#: Command id -> wire name, for stats (``cmd_get``) and logs.
COMMAND_NAMES = {value: name.decode() for name, value in COMMANDS.items()}

GET_COMMANDS = frozenset((CMD_GET, CMD_GETS, CMD_GAT, CMD_GATS))
STORAGE_COMMANDS = frozenset(
    (CMD_SET, CMD_ADD, CMD_CAS, CMD_APPEND, CMD_PREPEND, CMD_REPLACE))
META_COMMANDS = frozenset((CMD_MG, CMD_MS, CMD_MD, CMD_MN, CMD_MA, CMD_ME))
KEYLESS_COMMANDS = frozenset((CMD_QUIT, CMD_STATS, CMD_WATCH, CMD_VERSION, CMD_MN,
                              CMD_FLUSH_ALL, CMD_VERBOSITY, CMD_CACHE_MEMLIMIT))
#: Commands always answered by the proxy itself, never handed to a route
#: (``cache_memlimit`` sizes the embedded cache; the backends' memory is
#: their operators').
LOCAL_ONLY_COMMANDS = frozenset((CMD_MN, CMD_QUIT, CMD_CACHE_MEMLIMIT))
#: Keyless commands a pool sends to every one of its backends (not to the
#: backend of a key): ``flush_all`` and ``verbosity`` address whole servers.
BROADCAST_COMMANDS = frozenset((CMD_FLUSH_ALL, CMD_VERBOSITY))

#: How many tokens the parser indexes per command (memcached's caps).
_TOKEN_CAPS = {
    CMD_GET: 2, CMD_GETS: 2, CMD_GAT: 3, CMD_GATS: 3,
    CMD_INCR: 4, CMD_DECR: 4, CMD_TOUCH: 4, CMD_DELETE: 4,
    CMD_QUIT: 1, CMD_MN: 1,
}
_DEFAULT_CAP = 24

#: Longest request line a route may receive (bytes, including CRLF).
MAX_REQUEST_LINE = 500
#: Longest key accepted inside a split multiget.
MAX_KEY_LENGTH = 250
#: Bytes a client may send without a newline before we hang up on it,
#: unless the buffered bytes are a ``get``/``gets`` multiget.
MAX_UNTERMINATED = 1024
#: Largest payload length a storage command may declare (INT_MAX - 2).
MAX_VALUE_LENGTH = 2**31 - 3
#: Most requests in one run of plain requests (see :func:`scan_plain`).
MAX_RUN = 256
#: Most tokens of an ``ms`` line (key, length and 16 flags): memcached
#: answers more with ``CLIENT_ERROR options flags too long`` and then reads
#: the payload as a command.
MAX_MS_TOKENS = 19
#: A key as the fast paths take it: no space, CR, LF or NUL, at most
#: MAX_KEY_LENGTH bytes (possessive: the match never backtracks). Any other
#: key is left to the general parser.
_KEY = rb"[^ \r\n\x00]{1,%d}+" % MAX_KEY_LENGTH
#: Consecutive ``get <key>`` lines that parse_request's fast path takes
#: (a third faster than one match per line).
_GET_LINES = re.compile(rb"(?:get %s\r\n)+" % _KEY)
#: A ``get <key>`` line that parse_request's fast path takes: a key of at
#: most MAX_KEY_LENGTH bytes without space, LF or NUL (one match costs less
#: than testing the key for each: ``bytes in bytes`` raises and clears a
#: TypeError inside CPython before it searches).
_PLAIN_GET = re.compile(rb"get [^ \n\x00]{1,%d}\r\n" % MAX_KEY_LENGTH)
#: A ``set <key> <flags> <exptime> <bytes>`` line that parse_request's fast
#: path takes (numbers in range by their digit count alone); groups: key,
#: bytes.
_SET_LINE = re.compile(rb"set (%s) \d{1,19}+ \d{1,18}+ (\d{1,9}+)\r\n" % _KEY)
#: The bytes of a ``get <key>`` line around its key.
_GET_LINE_EXTRA = 6
#: A ``get`` of several keys, one space between them, each short enough
#: that the proxy routes the keys together (see ProxyServerProtocol._multiget).
_MULTI_GET = re.compile(rb"get (?:%s )++%s\r\n" % (_KEY, _KEY))


class ParseError(ValueError):
    """The line is not one request the proxy serves or forwards.

    ``reply`` is what the client gets: ``SERVER_ERROR parsing request`` for
    what memcached's proxy cannot parse (memcached's commands it does not
    serve among them), else the error memcached itself would answer first
    (``ERROR`` for a command memcached does not know). ``vlen`` (with
    CRLF), when not 0, is the payload that follows the line: the proxy reads
    and drops it, so that one refused request gets one reply (memcached
    would read it as a command). ``unknown``: the line's command is none
    the proxy serves (memcached's proxy 1.6.45 closes the connection on it).
    ``strict``: memcached answers the line ``reply``, where memcached's proxy
    1.6.45 refuses it as one it cannot parse (mcproxy.wire.behaviour).
    """

    def __init__(self, reason: str, reply: bytes = PARSING_REQUEST, vlen: int = 0,
                 unknown: bool = False, strict: bool = False) -> None:
        super().__init__(reason)
        self.reply = reply
        self.vlen = vlen
        self.unknown = unknown
        self.strict = strict


class Request:
    """One parsed client request.

    ``line`` is the command line exactly as received, including its CRLF;
    ``value`` is the payload including its CRLF (storage commands only, set
    once it has been read). ``vlen`` is the payload length to read including
    the CRLF, 0 for commands without payload.
    """

    __slots__ = ("command", "line", "tokens", "key", "vlen", "value",
                 "noreply", "quiet", "multiget")

    def __init__(self, command: int, line: bytes, tokens: list[bytes],
                 key: bytes, vlen: int = 0, noreply: bool = False,
                 quiet: bool = False) -> None:
        self.command = command
        self.line = line
        self.tokens = tokens
        self.key = key
        self.vlen = vlen
        self.value: bytes | None = None
        self.noreply = noreply
        self.quiet = quiet
        self.multiget = False

    def __repr__(self) -> str:
        return f"<Request {self.line!r}>"

    def wire_line(self) -> bytes:
        """The command line to send to a backend.

        A text ``noreply`` token is removed (with the space before it) so the
        backend answers and the proxy can tell success from failure; meta
        ``q`` flags are removed for the same reason. The client still gets
        nothing for what memcached would suppress.
        """
        if self.noreply:
            # A second noreply would be the one the backend obeys; a keyless
            # command keeps only its name.
            tokens = self.tokens[:-1]
            keep = 1 if self.command in KEYLESS_COMMANDS else 2
            while len(tokens) > keep and _is_noreply(tokens[-1]):
                tokens.pop()
            return b" ".join(tokens) + b"\r\n"
        if self.quiet:
            first_flag = 3 if self.command == CMD_MS else 2
            # Split the capped last token too: a q flag inside it would
            # still silence the backend.
            flags = [t for t in b" ".join(self.tokens[first_flag:]).split(b" ") if t]
            kept = [t for t in flags if t[:1] != b"q"]
            if len(flags) - len(kept) > 1:
                # A repeated q is memcached's "duplicate flag" error, which
                # quiet mode does not silence: the backend must see it.
                return self.line
            return b" ".join(self.tokens[:first_flag] + kept) + b"\r\n"
        return self.line

    def wire(self) -> bytes:
        """Line plus payload, as a backend receives it."""
        if self.value is None:
            return self.wire_line()
        return self.wire_line() + self.value


def _tokenize(body: bytes, cap: int) -> list[bytes]:
    """Split on spaces, skipping runs, indexing at most ``cap`` tokens."""
    if b"  " not in body and body[:1] != b" " and body[-1:] != b" ":
        return body.split(b" ", cap - 1)
    tokens: list[bytes] = []
    rest = body.lstrip(b" ")
    while rest:
        if len(tokens) == cap - 1:
            tokens.append(rest)
            break
        token, _, rest = rest.partition(b" ")
        tokens.append(token)
        rest = rest.lstrip(b" ")
    return tokens


def _length(token: bytes) -> int:
    """A payload length token as memcached reads it; its parse errors
    (none, negative, over INT_MAX - 2) are memcached's proxy's."""
    length = strtol(token)
    if length is None or not 0 <= length <= MAX_VALUE_LENGTH:
        raise ParseError("bad length")
    return length


def _storage(command: int, line: bytes, tokens: list[bytes]) -> Request:
    """A storage line, refused where memcached would refuse it before
    reading its payload (token count, key length, flags, exptime, cas):
    memcached would answer an error and then run the payload as a
    command, two replies for one request."""
    ntokens = len(tokens)
    if ntokens < 5:
        raise ParseError("too few tokens")
    vlen = _length(tokens[4]) + 2
    expected = 6 if command == CMD_CAS else 5
    if not expected <= ntokens <= expected + 1 or b" " in tokens[-1]:
        raise ParseError("wrong number of tokens", ERROR, vlen)
    key = tokens[1]
    if len(key) > MAX_KEY_LENGTH:
        raise _key_too_long(line, vlen)
    if strtoull(tokens[2]) is None or strtol(tokens[3]) is None \
            or (command == CMD_CAS and strtoull(tokens[5]) is None):
        raise ParseError("bad number", BAD_COMMAND_LINE, vlen)
    noreply = ntokens > expected and _is_noreply(tokens[-1])
    return Request(command, line, tokens, key, vlen, noreply=noreply)


def _is_noreply(token: bytes) -> bool:
    """memcached's test of the last token (``strcmp``; a capped last token
    may carry the line's trailing spaces)."""
    return token.rstrip(b" ") == b"noreply"


def _key_too_long(line: bytes, vlen: int = 0) -> ParseError:
    """The refusal of a key over MAX_KEY_LENGTH: memcached's error, or in a
    line too long to route memcached's proxy's (which closes)."""
    if len(line) >= MAX_REQUEST_LINE:
        return ParseError("line too long", REQUEST_TOO_LONG)
    return ParseError("key too long", BAD_COMMAND_LINE, vlen)


def parse_request(line: bytes) -> Request:
    """Parse a command line (which must end in ``\\r\\n``).

    Raises :class:`ParseError` for any line that is not one request the
    proxy serves or forwards (see the module docstring). Plain ``get <key>`` and ``set <key>
    <flags> <exptime> <bytes>`` lines (most of the traffic) take a fast path
    that returns exactly what :func:`_parse_general` would, without its
    tokenising and number checks; any other line goes there.
    """
    if line[-2:] == b"\r\n":
        head = line[:4]
        if head == b"get ":
            if _PLAIN_GET.fullmatch(line) is not None:
                key = line[4:-2]
                return Request(CMD_GET, line, [b"get", key], key)
        elif head == b"set ":
            tokens = line[:-2].split(b" ")
            vlen = _plain_set(tokens)
            if vlen:
                return Request(CMD_SET, line, tokens, tokens[1], vlen)
    return _parse_general(line)


def _plain_set(tokens: list[bytes]) -> int:
    """The payload length (with CRLF) of a ``set`` line split on spaces
    whose numbers are in range by their digit count alone; 0 for any
    other line (which the general parser then judges)."""
    if len(tokens) == 5:
        key, flags, exptime, length = tokens[1], tokens[2], tokens[3], tokens[4]
        if key and len(key) <= MAX_KEY_LENGTH and b"\n" not in key \
                and b"\x00" not in key and len(flags) <= 19 and flags.isdigit() \
                and len(exptime) <= 18 and exptime.isdigit() \
                and len(length) <= 9 and length.isdigit():
            return int(length) + 2
    return 0


def scan_plain(data: bytes, pos: int, sets: bool, max_payload: int,
               limit: int = MAX_RUN, multigets: int = 0,
               ) -> tuple[int, list[bytes], list[int], list[int], dict[int, int] | None]:
    """The run of plain requests in ``data`` from ``pos``: consecutive
    ``get <key>`` lines, with ``multigets`` also ``get <key> <key>...``
    lines of at most that many keys (each key at most MAX_KEY_LENGTH long,
    one space between them), and with ``sets`` ``set <key> <flags>
    <exptime> <bytes>`` lines whose payload (at most ``max_payload`` bytes,
    ending in CRLF) is in ``data`` too; each line parsed by
    :func:`parse_request` as here, those of single-key requests shorter
    than MAX_REQUEST_LINE; at most ``limit`` requests.

    Returns ``(stop, keys, ends, sets, widths)``: the offset after the run,
    the key (a multi-key get's keys) and end offset of each request, the
    indexes of the sets, and None or the number of keys of each multi-key
    get by its index. The run stops before anything else, which the caller
    parses line by line.
    """
    if scan_compiled is not None and data.__class__ is bytes:
        return scan_compiled(data, pos, sets, max_payload, limit, multigets)
    keys: list[bytes] = []
    ends: list[int] = []
    widths: dict[int, int] | None = None
    set_at: list[int] = []
    size = len(data)
    while pos < size and len(keys) < limit:
        gets = _GET_LINES.match(data, pos)
        if gets is not None:
            stop = gets.end()
            if data.count(b"\n", pos, stop) == 1:
                keys.append(data[pos + 4:stop - 2])
                ends.append(stop)
                pos = stop
                continue
            # A stretch of gets at C speed: one match, one split (a key
            # holds no CR, so only the lines' joints split).
            got = data[pos + 4:stop - 2].split(b"\r\nget ")
            del got[limit - len(keys):]
            keys += got
            offsets = accumulate(map(_GET_LINE_EXTRA.__add__, map(len, got)), initial=pos)
            next(offsets)
            ends += offsets
            pos = ends[-1]
            continue
        if multigets:
            multi = _MULTI_GET.match(data, pos)
            if multi is not None:
                stop = multi.end()
                width = data.count(b" ", pos, stop)
                if width > multigets:
                    break
                if widths is None:
                    widths = {}
                widths[len(keys)] = width
                keys.append(data[pos + 4:stop - 2])
                ends.append(stop)
                pos = stop
                continue
        line = _SET_LINE.match(data, pos) if sets else None
        if line is None:
            break
        vlen = int(line[2]) + 2
        end = line.end() + vlen
        if vlen > max_payload + 2 or end > size or data[end - 2:end] != b"\r\n":
            break
        set_at.append(len(keys))
        keys.append(line[1])
        ends.append(end)
        pos = end
    return pos, keys, ends, set_at, widths


#: scan_plain for ``bytes`` (a client protocol's reads), every argument
#: given in order: the compiled scan itself where it is built, without the
#: call through scan_plain.
scan_bytes = scan_plain if scan_compiled is None else scan_compiled


def _parse_general(line: bytes) -> Request:
    """:func:`parse_request` for every line, without its fast paths."""
    if len(line) < 4 or line[-2:] != b"\r\n":
        raise ParseError("line too short or not CRLF terminated")
    if line.find(b"\n", 0, -1) >= 0:
        raise ParseError("more than one line")
    req = _parse_tokens(line)
    if b"\x00" in line:
        # memcached reads the line as a C string: up to the NUL only.
        raise ParseError("NUL in the line", BAD_COMMAND_LINE, req.vlen)
    return req


def _parse_tokens(line: bytes) -> Request:
    """The request of a CRLF-terminated line, by its command's rules."""
    body = line[:-2]
    name, _, _ = body.partition(b" ")
    command = COMMANDS.get(name)
    if command is None:
        raise ParseError("unknown command", PARSING_REQUEST if name in NOT_SERVED else ERROR,
                         unknown=True)
    tokens = _tokenize(body, _TOKEN_CAPS.get(command, _DEFAULT_CAP))
    ntokens = len(tokens)

    if command in GET_COMMANDS:
        if command is CMD_GET or command is CMD_GETS:
            key_token = tokens[1] if ntokens > 1 else b""
        else:
            if ntokens < 3:
                raise ParseError("too few tokens")
            key_token = tokens[2]
        key = key_token.partition(b" ")[0]
        if not key:
            raise ParseError("no key")
        if len(key) > MAX_KEY_LENGTH and b" " not in key_token:
            # A multiget answers each long key in place (split_multiget).
            raise _key_too_long(line)
        return Request(command, line, tokens, key)

    if command in KEYLESS_COMMANDS:
        # memcached reads noreply of flush_all and verbosity only where their
        # token counts are right (at most ``flush_all <delay> noreply``).
        noreply = (command in BROADCAST_COMMANDS and 2 <= ntokens <= 3
                   and _is_noreply(tokens[-1]))
        return Request(command, line, tokens, b"", noreply=noreply)
    if command in STORAGE_COMMANDS:
        return _storage(command, line, tokens)
    if ntokens < 2:
        raise ParseError("too few tokens")
    key = tokens[1]

    if command in META_COMMANDS:
        vlen = 0
        first_flag = 2
        if command == CMD_MS:
            if ntokens < 3:
                raise ParseError("too few tokens")
            vlen = _length(tokens[2]) + 2
            if ntokens > MAX_MS_TOKENS:
                raise ParseError("too many flags", OPTIONS_TOO_LONG, vlen)
            first_flag = 3
        if len(key) > MAX_KEY_LENGTH:
            raise _key_too_long(line, vlen)
        quiet = False
        for flag in tokens[first_flag:]:
            first = flag[0]
            if first < 65 or first > 122:
                raise ParseError("bad meta flag")
            if first == 113:  # q
                quiet = True
        # memcached's me has no quiet mode: a q there silences nothing, and
        # the line must reach the backend as sent (only its first flag is
        # read: "me <key> q b" looks up the key as it is, "me <key> b" decodes it)
        return Request(command, line, tokens, key, vlen, quiet=quiet and command != CMD_ME)

    # incr, decr, touch, delete
    if ntokens < 3 and command is not CMD_DELETE:
        # memcached answers ERROR; its proxy 1.6.45 cannot parse it
        raise ParseError("too few tokens", ERROR, strict=True)
    if len(key) > MAX_KEY_LENGTH:
        raise _key_too_long(line)
    noreply = ntokens > 2 and _is_noreply(tokens[-1])
    return Request(command, line, tokens, key, noreply=noreply)


def split_multiget(req: Request) -> list[bytes] | None:
    """The keys of a multiget, or None if ``req`` is a single-key request.

    A GET-family request is a multiget when its first key is followed by a
    space (a trailing space alone counts, as in memcached's proxy).
    """
    keys_token = req.tokens[-1]
    if b" " not in keys_token:
        return None
    return [k for k in keys_token.split(b" ") if k]


def multiget_prefix(req: Request) -> bytes:
    """The bytes before the first key (``b"get "``, ``b"gat 10 "``)."""
    keys_token = req.tokens[-1]
    return req.line[: len(req.line) - 2 - len(keys_token)]


def multiget_key(req: Request, prefix: bytes, key: bytes) -> Request:
    """The request of one key of the multiget ``req`` (whose line begins
    ``prefix``, see :func:`multiget_prefix`), as it is routed on its own."""
    sub = Request(req.command, prefix + key + b"\r\n", [*req.tokens[:-1], key], key)
    sub.multiget = True
    return sub


#: The commands of KeyRequests, by their wire names.
_KEY_COMMANDS = {CMD_GET: b"get", CMD_GETS: b"gets"}


def sent_request(sent: bytes) -> Request:
    """The Request of a plain request (``scan_plain``'s) from the bytes the
    client sent: its line, and a set's payload."""
    line = sent.index(b"\n") + 1
    req = parse_request(sent[:line])
    if req.vlen:
        req.value = sent[line:]
    return req


def key_request(command: int, key: bytes, multiget: bool) -> Request:
    """The ``get``/``gets`` request of one key, as :func:`parse_request`
    makes it, or (``multiget``) as :func:`multiget_key` makes a key of a
    ``get``/``gets`` multiget."""
    name = _KEY_COMMANDS[command]
    sub = Request(command, b"%s %s\r\n" % (name, key), [name, key], key)
    sub.multiget = multiget
    return sub


class KeyRequests:
    """``get``/``gets`` requests that differ only by their key: the keys
    of a client multiget, or a run of plain gets (``multiget`` False); or
    plain gets and sets (``sets``: the indexes of the sets), each the bytes
    of ``sent`` as the client sent it (its line, a set's payload too). Each
    Request (:func:`key_request`, or parsed from what was sent) is made
    only when first asked for, then kept: a route that only reads a key and
    sends it on never needs one."""

    __slots__ = ("command", "keys", "multiget", "made", "sets", "sent")

    def __init__(self, command: int, keys: list[bytes], multiget: bool,
                 sets: list[int] | None = None, sent: list[bytes] | None = None) -> None:
        self.command = command
        self.keys = keys
        self.multiget = multiget
        #: index -> the Request made for that key
        self.made: dict[int, Request] = {}
        self.sets = sets
        self.sent = sent

    @property
    def name(self) -> bytes:
        """The command's wire name."""
        return _KEY_COMMANDS[self.command]

    def request(self, index: int) -> Request:
        sub = self.made.get(index)
        if sub is None:
            sent = self.sent
            if sent is None:
                sub = key_request(self.command, self.keys[index], self.multiget)
            else:
                sub = sent_request(sent[index])
            self.made[index] = sub
        return sub


# -- Edits made by routes (r:token(i, s), r:ltrimkey(n) ...) -------------------

class EditError(ValueError):
    """A route's edit would leave the request malformed; the text is the Lua error."""


def key_index(req: Request) -> int:
    """0-based index of the key token (gat/gats carry the exptime first)."""
    return 2 if req.command in (CMD_GAT, CMD_GATS) else 1


def _first_flag(req: Request) -> int:
    return 3 if req.command == CMD_MS else key_index(req) + 1


def _words(line: bytes) -> int:
    """How many space-separated words memcached reads in ``line``."""
    return sum(1 for word in line.rstrip(b"\r\n").split(b" ") if word)


def _rerender(req: Request, tokens: list[bytes]) -> None:
    """Re-parse ``req`` from edited tokens, keeping its payload.

    As in memcached, the payload and its length stay what they were: an
    edit can change the command line, never make the proxy send bytes the
    client did not send.
    """
    line = b" ".join(t for t in tokens if t) + b"\r\n"
    if len(line) >= MAX_REQUEST_LINE:
        raise EditError("token(): request malformed after edit")
    try:
        edited = parse_request(line)
    except ParseError:
        raise EditError("token(): request malformed after edit") from None
    if edited.vlen != req.vlen:
        # The line would declare a payload other than the one it carries.
        raise EditError("token(): request malformed after edit")
    if edited.command in GET_COMMANDS and _words(line) != _words(req.line):
        # A space in a get's key makes more keys: memcached would answer
        # each, where the proxy awaits one reply per key it sent.
        raise EditError("token(): request malformed after edit")
    req.command = edited.command
    req.line = edited.line
    req.tokens = edited.tokens
    req.key = edited.key
    req.noreply = edited.noreply
    req.quiet = edited.quiet


def set_token(req: Request, index: int, token: bytes) -> None:
    """Replace token ``index`` (1-based); an empty token removes it."""
    if index < 1 or index > len(req.tokens):
        raise EditError("token(): index out of range")
    tokens = list(req.tokens)
    tokens[index - 1] = token
    _rerender(req, tokens)


def trim_key(req: Request, count: int, left: bool) -> None:
    """Drop ``count`` bytes from the start (left) or end of the key."""
    side = "ltrimkey" if left else "rtrimkey"
    if count < 0 or count > len(req.key):
        raise EditError(f"{side} cannot zero out key")
    index = key_index(req)
    key = req.key[count:] if left else req.key[: len(req.key) - count]
    tokens = list(req.tokens)
    tokens[index] = key
    req.key = key
    req.tokens = tokens
    req.line = b" ".join(tokens) + b"\r\n"


def check_flag(flag: bytes) -> int:
    """The byte of a one-letter meta flag, as has_flag() validates it."""
    if len(flag) != 1:
        raise EditError("has_flag(): meta flag must be a single character")
    if not 65 <= flag[0] <= 122:
        raise EditError("has_flag(): invalid flag, must be A-Z,a-z")
    return flag[0]


def find_flag(req: Request, flag: bytes) -> int | None:
    """Index of the first flag token starting with ``flag``, or None."""
    letter = check_flag(flag)
    tokens = req.tokens
    for index in range(_first_flag(req), len(tokens)):
        if tokens[index][:1] and tokens[index][0] == letter:
            return index
    return None


# -- Flag edits of memcached 1.6.45 (r:flag_add/set/replace/del) -------------

#: An edit that adds at most this much to a line is tried (memcached's
#: proxy: the line, the token and a flag with its space, within 500 bytes).
_EDIT_ROOM = 500
#: Longest flag token flag_token_int() reads a number from (mcmc's limit:
#: a longer one counts as absent).
_FLAG_INT_DIGITS = 22
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _token_starts(req: Request) -> list[int]:
    """Where each of ``req.tokens`` starts in ``req.line`` (runs of spaces
    between tokens kept, as memcached's proxy keeps them when it edits)."""
    starts = []
    pos = 0
    line = req.line
    for token in req.tokens:
        pos = line.index(token, pos)
        starts.append(pos)
        pos += len(token)
    return starts


def _apply_flag_edit(req: Request, line: bytes) -> bool:
    """Take the edited ``line`` if it is one request memcached reads as one
    with the same payload: parse_request's rules, under MAX_REQUEST_LINE,
    the same command and key, and for the get family still one key (an
    appended flag would be a second key of a multiget). Else leave ``req``
    as it was: False, memcached's proxy's answer to an edit it cannot parse."""
    if len(line) >= MAX_REQUEST_LINE:
        return False
    try:
        edited = parse_request(line)
    except ParseError:
        return False
    if edited.vlen != req.vlen or edited.command != req.command or edited.key != req.key \
            or (edited.command in GET_COMMANDS and split_multiget(edited) is not None):
        return False
    req.line = edited.line
    req.tokens = edited.tokens
    req.noreply = edited.noreply
    req.quiet = edited.quiet
    return True


def append_flag(req: Request, flag: bytes, token: bytes) -> bool:
    """Add the flag token ``flag + token`` at the end of the line."""
    return _apply_flag_edit(req, req.line[:-2] + b" " + flag + token + b"\r\n")


def render_flag(req: Request, index: int, flag: bytes, token: bytes) -> bool:
    """Replace token ``index`` (0-based) by ``flag + token``; both empty
    remove it. As memcached's proxy does it: what follows the token starts
    at the next token, the spaces before the token stay, and removing the
    last token drops the spaces it leaves at the end."""
    line = req.line
    if len(line) + len(token) + 2 > _EDIT_ROOM:
        return False
    starts = _token_starts(req)
    head = line[:starts[index]] + flag + token
    if index + 1 < len(starts):
        if flag or token:
            head += b" "
        head += line[starts[index + 1]:-2]
    else:
        head = head.rstrip(b" ")
    return _apply_flag_edit(req, head + b"\r\n")


def flag_int(req: Request, letter: int) -> tuple[bool, int | None]:
    """``r:flag_token_int``: whether the first flag token of ``letter`` has
    a value, and its value as a signed 64-bit number (None if it is not
    one). A bare flag, or one whose value is over 22 bytes, is absent."""
    tokens = req.tokens
    for index in range(_first_flag(req), len(tokens)):
        token = tokens[index]
        if token[:1] and token[0] == letter:
            value = token[1:]
            if not value or len(value) > _FLAG_INT_DIGITS:
                return False, None
            negative = value[:1] == b"-"
            digits = value[1:] if negative else value
            if digits and not digits.isdigit():
                return True, None
            # mcmc reads "-" alone as 0
            number = int(digits or b"0")
            if negative:
                number = -number
            if not _INT64_MIN <= number <= _INT64_MAX:
                return True, None
            return True, number
    return False, None
