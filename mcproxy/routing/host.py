"""The Python half of the ``mcp`` module: what Lua calls to touch Python.

``Host`` is handed to ``mcp.lua``'s constructor. Its methods are called
from Lua with Lua values (strings arrive as ``bytes``, tables as lupa
``LuaTable``) and report misuse by returning an error string as their last
value, so that ``mcp.lua`` can raise it as a Lua error with the caller's
line number.
"""

from __future__ import annotations

import random
import time
from typing import Any

from twisted.logger import Logger

from mcproxy.backends.options import BackendOptions, TLSOptionError, client_tls
from mcproxy.backends.pool import BackendRegistry, Pool, PoolOptionError
from mcproxy.routing.tunables import TunableError, Tunables
from mcproxy.routing.userstats import UserStatError, UserStats
from mcproxy.units import GetRun, KeyFetch
from mcproxy.wire import request as rq
from mcproxy.wire.request import (
    EditError,
    KeyRequests,
    ParseError,
    Request,
    key_request,
    parse_request,
)
from mcproxy.wire.response import MCMC_RESP_META, Response, parse_response

#: Longest backend host name memcached accepts.
MAX_HOST_LENGTH = 254

#: Table-form ``mcp.backend{}`` keys and the BackendOptions field each sets.
_BACKEND_OPTION_KEYS = {
    "connecttimeout": "connect_timeout",
    "retrytimeout": "retry_timeout",
    "retrywaittime": "retry_timeout",
    "readtimeout": "read_timeout",
    "failurelimit": "failure_limit",
    "tcpkeepalive": "keepalive",
    "depthlimit": "depth_limit",
}

#: Table-form ``mcp.backend{}`` TLS keys and the kind of value each takes.
_BACKEND_TLS_KEYS = {
    "tls": bool,
    "tls_verify": bool,
    "tls_ca": bytes,
    "tls_hostname": bytes,
}


def lua_error(message: str) -> bytes:
    """An error message as Lua receives it (the runtime holds bytes)."""
    return message.encode()


def text(value: Any) -> str:
    """A Lua string (bytes) as str, for names and messages."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class Host:
    """Services a Lua state's ``mcp`` module asks of Python.

    One Host serves one load of the config (both its phases). ``phase`` is
    switched by the engine between ``"config"`` and ``"routes"``.
    """

    logger = Logger(namespace="mcproxy.routing")

    def __init__(self, path: str, registry: BackendRegistry,
                 tunables: Tunables, user_stats: UserStats, store=None) -> None:
        self.path = path
        self.registry = registry
        self.tunables = tunables
        self.user_stats = user_stats
        self.store = store
        #: backends created or reused by this load, in creation order, and
        #: the options this load gave each
        self.backends: list = []
        self.options: list[BackendOptions] = []
        #: pools made by this load's mcp_config_pools, in creation order
        self.pools: list[Pool] = []
        #: stat names added by this load's mcp_config_pools: index -> name
        self.stat_names: dict[int, str] = {}
        #: the keys of the batches being routed (engine._LuaKeys), by the
        #: number Lua knows each by
        self.batches: dict[int, KeyRequests] = {}

    # -- backends and pools ------------------------------------------------

    def backend(self, label: bytes, host: bytes, port: bytes,
                options: BackendOptions | None = None):
        if len(host) > MAX_HOST_LENGTH:
            return None, lua_error("backend name too long")
        if not port or len(port) > 6:
            return None, lua_error(f"mcp.backend: bad port {text(port)!r}")
        if options is None:
            options = self.tunables.backend_options()
        if options.tls:
            try:
                client_tls(text(host), options)
            except TLSOptionError as e:
                return None, lua_error(f"mcp.backend: {e}")
        backend = self.registry.get(text(label), text(host), text(port), options)
        self.backends.append(backend)
        self.options.append(options)
        return backend, None

    def backend_from_table(self, table):
        fields = {text(k): v for k, v in table.items()}
        for name in ("label", "host"):
            if not isinstance(fields.get(name), bytes):
                return None, lua_error(f"mcp.backend: '{name}' must be a string")
        port = fields.get("port", b"11211")
        if isinstance(port, int | float):
            port = str(int(port)).encode()
        if not isinstance(port, bytes):
            return None, lua_error("mcp.backend: 'port' must be a string or a number")
        overrides = {}
        for key, value in fields.items():
            if key in ("label", "host", "port"):
                continue
            if key == "down":
                if not isinstance(value, bool):
                    return None, lua_error("mcp.backend: 'down' must be a boolean")
                overrides["down"] = value
                continue
            kind = _BACKEND_TLS_KEYS.get(key)
            if kind is not None:
                if not isinstance(value, kind):
                    what = "a boolean" if kind is bool else "a string"
                    return None, lua_error(f"mcp.backend: '{key}' must be {what}")
                overrides[key] = text(value) if kind is bytes else value
                continue
            field = _BACKEND_OPTION_KEYS.get(key)
            if field is None:
                return None, lua_error(f"mcp.backend: unknown option '{key}'")
            if field == "keepalive":
                if not isinstance(value, bool):
                    return None, lua_error(f"mcp.backend: '{key}' must be a boolean")
            elif not isinstance(value, int | float) or isinstance(value, bool):
                return None, lua_error(f"mcp.backend: '{key}' must be a number")
            elif field in ("failure_limit", "depth_limit"):
                if value < 0:
                    return None, lua_error(f"mcp.backend: '{key}' must be >= 0")
                value = int(value)
            elif value <= 0:
                # a timeout of 0 would fail every request at once
                return None, lua_error(f"mcp.backend: '{key}' must be > 0")
            overrides[field] = value
        options = self.tunables.backend_options(**overrides)
        if not options.tls:
            for key in ("tls_verify", "tls_ca", "tls_hostname"):
                if key in overrides:
                    return None, lua_error(f"mcp.backend: '{key}' needs tls = true")
        return self.backend(fields["label"], fields["host"], port, options)

    def pool(self, backends, opts):
        members = [backends[i] for i in range(1, len(backends) + 1)]
        options = {}
        if opts is not None:
            options = {text(k): v for k, v in opts.items()}
        try:
            pool = Pool(members, options)
        except (PoolOptionError, ValueError) as e:
            return None, lua_error(str(e))
        self.pools.append(pool)
        return pool, None

    def pool_backend(self, pool: Pool, key: bytes):
        """``mcp.pool_backend(pool, key)``: the label of the backend for key."""
        try:
            return pool.select(key).label.encode(), None
        except ValueError as e:
            return None, lua_error(str(e))

    # -- user stats ----------------------------------------------------------

    def add_stat(self, index, name):
        if not isinstance(index, int) or isinstance(index, bool):
            return lua_error("stat index must be a number")
        if not isinstance(name, bytes):
            return lua_error("stat name must be a string")
        try:
            self.user_stats.check(index, text(name))
        except UserStatError as e:
            return lua_error(str(e))
        self.stat_names[index] = text(name)
        return None

    def stat(self, index, delta):
        if not isinstance(index, int) or not isinstance(delta, int):
            return lua_error("mcp.stat: index and delta must be integers")
        try:
            self.user_stats.add(index, delta)
        except UserStatError as e:
            return lua_error(str(e))
        return None

    # -- requests --------------------------------------------------------------

    def request(self, line: bytes, value):
        """``mcp.request(line [, value])``: a new request, validated."""
        if isinstance(value, Response):
            value = value.value
        elif isinstance(value, Request):
            value = value.value
        if value is not None and value[-2:] != b"\r\n":
            return None, lua_error("value passed to mcp.request must end with \\r\\n")
        if len(line) > rq.MAX_REQUEST_LINE:
            return None, lua_error("request length too long")
        if line[-2:] != b"\r\n":
            return None, lua_error("request must end with \\r\\n")
        try:
            req = parse_request(line)
        except ParseError:
            return None, lua_error("failed to parse request")
        if req.vlen:
            if value is None:
                return None, lua_error("mcp.request: storage request needs a value")
            if len(value) != req.vlen:
                return None, lua_error("mcp.request: value length does not match the request")
            req.value = value
        return req, None

    def key_request(self, batch: int, index: int, key: bytes, command: int,
                    multiget: bool) -> Request:
        """The Request of a lazy request (mcp.lua's REQUEST.__index): its
        batch's, while the batch is routed (``batches``), else its own."""
        keys = self.batches.get(batch)
        if keys is not None:
            return keys.request(index)
        return key_request(command, key, multiget)

    @staticmethod
    def key_response(fetch: KeyFetch | GetRun, index: int) -> Response:
        """The Response of a lazy response (mcp.lua's RESPONSE.__index)."""
        return fetch.response(index)

    def token(self, req: Request, index: int):
        tokens = req.tokens
        if 1 <= index <= len(tokens):
            return tokens[index - 1]
        return None

    def ntokens(self, req: Request) -> int:
        return len(req.tokens)

    def set_token(self, req: Request, index: int, token: bytes):
        try:
            rq.set_token(req, index, token)
        except EditError as e:
            return lua_error(str(e)), None
        return None, req.key

    def ltrimkey(self, req: Request, count: int):
        return self._trim(req, count, True)

    def rtrimkey(self, req: Request, count: int):
        return self._trim(req, count, False)

    def _trim(self, req: Request, count: int, left: bool):
        try:
            rq.trim_key(req, count, left)
        except EditError as e:
            return lua_error(str(e)), None
        return None, req.key

    def has_flag(self, req: Request, flag):
        if not isinstance(flag, bytes):
            return None, lua_error("has_flag(): meta flag must be a single character")
        try:
            return rq.find_flag(req, flag) is not None, None
        except EditError as e:
            return None, lua_error(str(e))

    def flag_token(self, req: Request, flag, replacement):
        """(found, value after the flag letter or None, error, key)."""
        if not isinstance(flag, bytes):
            return None, None, lua_error("has_flag(): meta flag must be a single character"), None
        try:
            index = rq.find_flag(req, flag)
            if index is None:
                return False, None, None, req.key
            token = req.tokens[index]
            if replacement is not None:
                rq.set_token(req, index + 1, replacement)
        except EditError as e:
            return None, None, lua_error(str(e)), None
        return True, token[1:] or None, None, req.key

    # -- responses ---------------------------------------------------------------

    def response_line(self, res: Response):
        """``res:line()``: a meta reply's flags, else the line without CRLF."""
        if not res.ok:
            return None
        line = res.line[:-2]
        if res.type == MCMC_RESP_META:
            skip = 2 if line[:2] == b"VA" else 1
            parts = line.split(b" ", skip)
            return parts[skip] if len(parts) > skip else None
        return line

    def internal(self, req: Request):
        """``mcp.internal(r)``: run the request against the embedded cache."""
        if self.store is None:
            res = Response.failure("nocache")
            return res, False, False
        clean = parse_request(req.wire_line())
        clean.value = req.value
        parsed = parse_response(self.store.execute(clean))
        res = parsed[0] if parsed else Response.failure("parsing")
        return res, res.ok, res.hit

    # -- logging, time and tunables ------------------------------------------------

    def log(self, message: bytes) -> None:
        self.logger.info("{msg}", msg=text(message), type="proxy_user")

    def log_req(self, req: Request, res: Response | None, detail: bytes) -> None:
        """An event for ``watch proxyreqs`` (memcached's proxy_req)."""
        self.logger.info(
            "proxy_req {command} key={key!r} status={status} elapsed={elapsed} {detail}",
            type="proxy_req", command=rq.COMMAND_NAMES.get(req.command, "?"),
            key=req.key, status=_status(res), elapsed=res.elapsed if res else 0,
            code=res.code if res else 0, detail=text(detail))

    def log_reqsample(self, ms, rate, allerr, req: Request, res: Response | None,
                      detail: bytes) -> None:
        """Log slow requests, a 1-in-``rate`` sample, and (``allerr``) errors."""
        slow = res is not None and ms and res.elapsed >= ms * 1000
        sampled = rate and rate > 0 and random.random() * rate < 1
        failed = allerr and (res is None or not res.ok)
        if slow or sampled or failed:
            self.log_req(req, res, detail)

    @staticmethod
    def time_real_millis() -> int:
        return int(time.time() * 1000)

    @staticmethod
    def time_mono_millis() -> int:
        return int(time.monotonic() * 1000)

    @staticmethod
    def init_tls():
        """``mcp.init_tls()``: an error unless pyOpenSSL is installed."""
        try:
            import OpenSSL  # noqa: F401
        except ImportError:
            return lua_error("mcp.init_tls: TLS needs pyOpenSSL: pip install 'twisted[tls]'")
        return None

    def tunable(self, name: bytes, value):
        try:
            self.tunables.set(text(name), value)
        except TunableError as e:
            return lua_error(str(e))
        return None


def _status(res: Response | None) -> str:
    if res is None:
        return "none"
    return "ok" if res.ok else (res.reason or "error")
