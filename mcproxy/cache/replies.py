"""The embedded cache's replies, exactly as memcached 1.6 writes them.

Lines the proxy also writes of its own accord come from
:mod:`mcproxy.wire.errors`, so each string is defined once.
"""

from __future__ import annotations

from mcproxy.cache import items
from mcproxy.wire import errors

CRLF = b"\r\n"
ERROR = errors.ERROR
END = errors.END
OK = errors.OK
BAD_FORMAT = errors.BAD_COMMAND_LINE
BAD_DATA_CHUNK = errors.BAD_DATA_CHUNK
TOO_LARGE = errors.OBJECT_TOO_LARGE
META_FLAGS_TOO_LONG = errors.OPTIONS_TOO_LONG

# -- text commands
STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
BAD_DELETE_FORMAT = (b"CLIENT_ERROR bad command line format.  "
                     b"Usage: delete <key> [noreply]\r\n")
INVALID_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
INVALID_DELTA_ARGUMENT = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
OUT_OF_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
MEMLIMIT_TOO_SMALL = b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
MEMLIMIT_NOT_BYTES = b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
VALUE_LINE = b"VALUE %b %d %d\r\n"
VALUE_LINE_CAS = b"VALUE %b %d %d %d\r\n"

#: The reply to an item that does not fit, by the reason Items.fits gives.
NO_ROOM = {items.TOO_LARGE: TOO_LARGE, items.NO_MEMORY: OUT_OF_MEMORY}
#: A storage command's reply, by the outcome of Items.store.
STORE_REPLIES = {items.STORED: STORED, items.EXISTS: EXISTS, items.NOT_FOUND: NOT_FOUND,
                 items.NOT_STORED: NOT_STORED}

# -- meta commands
MN = b"MN\r\n"
OUT_OF_MEMORY_VIVIFY = b"SERVER_ERROR Out of memory allocating new item\r\n"
MG_FLAGS_TOO_LONG = b"CLIENT_ERROR options flags are too long\r\n"
DUPLICATE_FLAG = b"CLIENT_ERROR duplicate flag\r\n"
INVALID_FLAG = b"CLIENT_ERROR invalid flag\r\n"
INVALID_OR_DUPLICATE_FLAG = b"CLIENT_ERROR invalid or duplicate flag\r\n"
BAD_TOKEN = b"CLIENT_ERROR bad token in command line format\r\n"
KEY_DECODE_ERROR = b"CLIENT_ERROR error decoding key\r\n"
BAD_M_TOKEN = b"CLIENT_ERROR incorrect length for M token\r\n"
INVALID_INITIAL = b"CLIENT_ERROR invalid numeric initial value\r\n"
INVALID_DELTA = b"CLIENT_ERROR invalid numeric delta value\r\n"
OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"
INVALID_MS_MODE = b"CLIENT_ERROR invalid mode for ms M token\r\n"
INVALID_MA_MODE = b"CLIENT_ERROR invalid mode for ma M token\r\n"

# Meta status codes and the pieces of meta reply lines.
HD = b"HD"
EN = b"EN"
VA = b"VA %d"
NF = b"NF"
NS = b"NS"
EX = b"EX"
#: ms's status code, by the outcome of Items.store.
MS_CODES = {items.STORED: HD, items.EXISTS: EX, items.NOT_FOUND: NF, items.NOT_STORED: NS}
ME_LINE = b"ME %b exp=%d la=%d cas=%d fetch=%b cls=%d size=%d\r\n"
