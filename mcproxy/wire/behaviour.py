"""The two wire behaviours of memcached's proxy that mcproxy speaks.

memcached's proxy changed what a client sees for requests it refuses:

* 1.6.15 (the release the V1 route API follows) answers a line it cannot
  parse ``SERVER_ERROR parsing request`` and refuses a line ending in a
  bare ``\\n`` the same way;
* 1.6.45 (the V2 API and the route library) reads a bare ``\\n`` as the
  end of a request line as memcached itself does (from 1.6.22), words its
  refusals ``CLIENT_ERROR ...`` (from 1.6.20), refuses some lines that
  memcached answers itself (``incr k``: memcached's ``ERROR``, the proxy's
  ``CLIENT_ERROR parsing request``), and closes the connection at once,
  without a reply, on a command it does not serve or a routed line that is
  too long; replies not yet written are dropped with it.

Which one a connection gets is the engine's ``wire`` (RouteEngine: by the
active config's API unless ``--wire`` names one), which the protocol reads
only when it refuses a line (a line ending in a bare ``\\n`` is refused by
the parser first), so that requests that parse pay nothing for it.
Pure: no Twisted imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mcproxy.wire.errors import (
    CLIENT_KEY_TOO_LONG,
    CLIENT_PARSING_REQUEST,
    KEY_TOO_LONG,
    PARSING_REQUEST,
)
from mcproxy.wire.request import ParseError


@dataclass(frozen=True)
class Wire:
    """What one release of memcached's proxy does with bad input."""

    #: the release, as ``--wire`` names it
    name: str
    #: a request line may end in a bare ``\\n`` (it is forwarded as ``\\r\\n``)
    bare_lf: bool
    #: an unknown command, or a routed line too long: close at once, no reply
    close_refused: bool
    #: lines memcached answers itself and this release cannot parse
    #: (ParseError.strict) get PARSING_REQUEST, as this release words it
    strict: bool
    #: the proxy's own error lines (as 1.6.15 words them) -> this release's
    words: dict[bytes, bytes] = field(default_factory=dict)

    def reply(self, line: bytes) -> bytes:
        """``line``, one of the proxy's own error lines, as this release says it."""
        return self.words.get(line, line)

    def refusal(self, error: ParseError) -> bytes:
        """What this release answers a line the parser refused."""
        return self.reply(PARSING_REQUEST if error.strict and self.strict else error.reply)


WIRE_1_6_15 = Wire("1.6.15", bare_lf=False, close_refused=False, strict=False)
WIRE_1_6_45 = Wire("1.6.45", bare_lf=True, close_refused=True, strict=True, words={
    PARSING_REQUEST: CLIENT_PARSING_REQUEST,
    KEY_TOO_LONG: CLIENT_KEY_TOO_LONG,
})

#: ``--wire`` values: ``auto`` follows the config (see RouteEngine.wire).
AUTO = "auto"
BEHAVIOURS = {wire.name: wire for wire in (WIRE_1_6_15, WIRE_1_6_45)}
