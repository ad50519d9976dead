"""Every reply line the proxy itself writes to clients, defined once.

The strings are those of memcached's proxy (mcp-api.md section 2.3).
"""

PARSING_REQUEST = b"SERVER_ERROR parsing request\r\n"
REQUEST_TOO_LONG = b"SERVER_ERROR request too long\r\n"
KEY_TOO_LONG = b"SERVER_ERROR key too long\r\n"
#: The same two refusals as memcached's proxy words them from 1.6.20 on
#: (mcproxy.wire.behaviour).
CLIENT_PARSING_REQUEST = b"CLIENT_ERROR parsing request\r\n"
CLIENT_KEY_TOO_LONG = b"CLIENT_ERROR key too long\r\n"
LUA_FAILURE = b"SERVER_ERROR lua failure\r\n"
BAD_RESPONSE = b"SERVER_ERROR bad response\r\n"
BACKEND_FAILURE = b"SERVER_ERROR backend failure\r\n"
BAD_DATA_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
# memcached's own answers to lines it refuses; the proxy gives them for
# requests it will not forward because memcached would not read them as one.
BAD_COMMAND_LINE = b"CLIENT_ERROR bad command line format\r\n"
OPTIONS_TOO_LONG = b"CLIENT_ERROR options flags too long\r\n"
ERROR = b"ERROR\r\n"
NO_ROUTE = b"SERVER_ERROR no route for command\r\n"
NOT_SUPPORTED = b"SERVER_ERROR command not supported\r\n"
END = b"END\r\n"
OK = b"OK\r\n"
# memcached's answers to ``stats cachedump`` and ``stats detail`` lines it refuses.
STATS_BAD_COMMAND_LINE = b"CLIENT_ERROR bad command line\r\n"
ILLEGAL_SLAB_ID = b"CLIENT_ERROR Illegal slab id\r\n"
DETAIL_USAGE = b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"
ACTIVE_REQUEST_LIMIT = b"SERVER_ERROR active request limit reached\r\n"
#: The first byte of a connection is the binary protocol's magic (0x80): the
#: body of the binary error response the proxy answers before it closes.
BINARY_PROTOCOL = b"binary protocol not supported"
#: A storage command declared a payload over the proxy's limit; the payload
#: is read and dropped (memcached's words and behaviour for an item too large).
OBJECT_TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
#: A broadcast command (``flush_all``, ``verbosity``) that every backend
#: it went to answered with ``OK``, and the answer when it reached none.
OK = b"OK\r\n"
#: A broadcast command that not every backend answered with ``OK``: how
#: many did not, of how many it went to, and what they failed to do.
BROADCAST_FAILED = b"SERVER_ERROR %d of %d backends failed to %s\r\n"
