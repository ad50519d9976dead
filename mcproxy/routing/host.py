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

from lupa.lua54 import lua_type
from twisted.logger import Logger

from mcproxy.backends.options import BackendLog, BackendOptions, TLSOptionError, client_tls
from mcproxy.backends.pool import BackendRegistry, Pool, PoolOptionError
from mcproxy.routing.crons import CronError, make_cron
from mcproxy.routing.ratelimits import RateLimitError, TokenBucket
from mcproxy.routing.tunables import TunableError, Tunables, waittime
from mcproxy.routing.userstats import UserStatError, UserStats
from mcproxy.units import KeyFetch, ReplyRun
from mcproxy.wire import request as rq
from mcproxy.wire.request import (
    EditError,
    KeyRequests,
    ParseError,
    Request,
    parse_request,
)
from mcproxy.wire.response import (
    MCMC_RESP_META,
    Response,
    blank_flag,
    match_reply,
    parse_response,
    raw_reply,
)

#: Longest backend host name memcached accepts.
MAX_HOST_LENGTH = 254

#: Table-form ``mcp.backend{}`` keys and the BackendOptions field each sets.
_BACKEND_OPTION_KEYS = {
    "connecttimeout": "connect_timeout",
    "retrytimeout": "retry_timeout",
    "readtimeout": "read_timeout",
    "failurelimit": "failure_limit",
    "tcpkeepalive": "keepalive",
    "depthlimit": "depth_limit",
}

#: Table-form ``mcp.backend{}`` keys of memcached 1.6.45 that mcproxy
#: refuses, and why (accepting them would ignore them).
REFUSED_BACKEND_KEYS = {
    "flaptime": "mcproxy has no flap detection (a bad backend is retried every "
                "retry wait time)",
    "flapbackofframp": "mcproxy has no flap detection",
    "flapbackoffmax": "mcproxy has no flap detection",
}

#: Names of memcached 1.6.45's ``mcp`` that mcproxy does not have, and why:
#: calling one is a Lua error that says so (mcp.lua), never a silent no-op.
REFUSED_NAMES = (
    ("backend_flap_time", "mcproxy has no flap detection (a bad backend is retried "
                          "every retry wait time)"),
    ("backend_flap_backoff_ramp", "mcproxy has no flap detection"),
    ("backend_flap_backoff_max", "mcproxy has no flap detection"),
    ("luagc_ratio", "mcproxy collects Lua garbage by the bytes of values handed to Lua"),
    ("buffer_memory_limit", "limit what waits for a client with --client-output-limit"),
    ("server_stats", "ask the proxy with a stats command instead"),
    ("req_inspector_new", "mcproxy has no request inspectors yet"),
    ("res_inspector_new", "mcproxy has no response inspectors yet"),
    ("req_mutator_new", "mcproxy has no request mutators yet"),
    ("res_mutator_new", "mcproxy has no response mutators yet"),
)

#: ``mcp.pool(backends, options)`` keys. ``iothread`` (memcached: the
#: pool's backends run on the IO thread) is accepted and means nothing
#: here: one reactor serves clients and backends.
POOL_OPTION_KEYS = frozenset({"dist", "hash", "seed", "filter", "filter_conf",
                              "omode", "obuckets", "iothread"})

#: memcached 1.6.45's pool options that mcproxy refuses, and why.
REFUSED_POOL_KEYS = {
    "beprefix": "mcproxy keeps one connection per backend label, host and port",
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


def backend_log(table) -> tuple[BackendLog | None, str | None]:
    """The ``log = { deadline =, rate =, errors =, tag = }`` option of a
    backend, checked as memcached 1.6.45 checks it; with none of deadline,
    rate and errors set, every request is logged (rate 1)."""
    if lua_type(table) != "table":
        return None, "backend log option must be a table"
    fields = {text(k): v for k, v in table.items()}
    for key in fields:
        if key not in ("deadline", "rate", "errors", "tag"):
            return None, f"unknown backend log option '{key}'"
    values = {}
    for key in ("deadline", "rate"):
        value = fields.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            return None, f"backend log {key} must be an integer"
        if value < 0:
            what = "deadline" if key == "deadline" else "sample rate"
            return None, f"backend log {what} must be >= 0"
        values[key] = value
    errors = fields.get("errors", False)
    if not isinstance(errors, bool):
        return None, "backend log errors must be a boolean"
    tag = fields.get("tag", b"")
    if not isinstance(tag, bytes):
        return None, "backend log tag must be a string"
    rate = values["rate"]
    if not values["deadline"] and not errors and not rate:
        rate = 1
    return BackendLog(values["deadline"] * 1000, rate, errors, text(tag)), None


class InternalHandler:
    """``mcp.internal_handler`` as a V2 handle's target: the embedded cache,
    seen as a pool of one backend that answers at once (as ``mcp.internal``
    does), so that request contexts send to it like to any pool."""

    options = BackendOptions()

    def __init__(self, host: Host) -> None:
        self._host = host

    def select(self, key: bytes) -> InternalHandler:
        return self

    def send(self, req: Request, callback) -> None:
        callback(self._host.internal(req)[0])


class Host:
    """Services a Lua state's ``mcp`` module asks of Python.

    One Host serves one load of the config (both its phases). ``phase`` is
    switched by the engine between ``"config"`` and ``"routes"``.
    """

    logger = Logger(namespace="mcproxy.routing")

    def __init__(self, path: str, registry: BackendRegistry,
                 tunables: Tunables, user_stats: UserStats, store=None,
                 clock=None, schedule_reload=None) -> None:
        self.path = path
        if clock is None:
            from twisted.internet import reactor as clock
        #: the engine's clock (crons, rate limits, rctx:sleep)
        self.clock = clock
        #: what mcp.schedule_config_reload() calls (None: nothing to reload)
        self.schedule_reload = schedule_reload
        #: crons registered by this load's config phase: name -> Cron
        self.crons: dict = {}
        #: what a handle to mcp.internal_handler sends to
        self.internal_handler = InternalHandler(self)
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
            if key in REFUSED_BACKEND_KEYS:
                return None, lua_error(f"mcp.backend: option '{key}' is not supported: "
                                       f"{REFUSED_BACKEND_KEYS[key]}")
            if key == "retrywaittime":
                if not isinstance(value, int | float) or isinstance(value, bool):
                    return None, lua_error(f"mcp.backend: '{key}' must be a number")
                overrides["retry_timeout"] = float(waittime(value))
                continue
            if key == "connections":
                if not isinstance(value, int) or isinstance(value, bool):
                    return None, lua_error("mcp.backend: 'connections' must be an integer")
                if not 1 <= value <= 8:
                    return None, lua_error("mcp.backend: 'connections' must be 1 to 8")
                if value > 1:
                    return None, lua_error("mcp.backend: 'connections' above 1 is not "
                                           "supported: mcproxy pipelines every request "
                                           "of a backend on one connection")
                continue
            if key == "log":
                log, error = backend_log(value)
                if error:
                    return None, lua_error(f"mcp.backend: {error}")
                overrides["log"] = log
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
        for key in options:
            if key not in POOL_OPTION_KEYS:
                why = REFUSED_POOL_KEYS.get(key)
                if why is not None:
                    return None, lua_error(f"mcp.pool: option '{key}' is not supported: {why}")
                return None, lua_error(f"mcp.pool: unknown option '{key}'")
        if "iothread" in options:
            if not isinstance(options.pop("iothread"), bool):
                return None, lua_error("mcp.pool: 'iothread' must be a boolean")
        try:
            pool = Pool(members, options)
        except (PoolOptionError, ValueError) as e:
            return None, lua_error(str(e))
        self.pools.append(pool)
        return pool, None

    def pool_logs(self, pool: Pool) -> bool:
        """Whether a backend of ``pool`` has a ``log`` option in this load
        (a V2 route to it then stays off the direct path, which logs
        nothing)."""
        options = {id(backend): opts for backend, opts in zip(self.backends, self.options,
                                                             strict=True)}
        return any(options[id(backend)].log is not None for backend in pool.backends)

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
        if index > self.tunables.stat_limit:
            return lua_error(f"stat index must be {self.tunables.stat_limit} or less "
                             f"(mcp.stat_limit)")
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

    @staticmethod
    def key_request(requests: KeyRequests, index: int) -> Request:
        """The Request of a lazy request (mcp.lua's REQUEST.__index): the
        one its batch's ``requests`` make for it."""
        return requests.request(index)

    @staticmethod
    def key_response(fetch: KeyFetch | ReplyRun, index: int) -> Response:
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

    # -- memcached 1.6.45's request methods (flags checked by mcp.lua) ----------

    @staticmethod
    def raw_line(req: Request) -> bytes:
        """``r:raw_line()``: the request line as it would be sent, without CRLF."""
        return req.line[:-2]

    @staticmethod
    def raw_value(req: Request) -> bytes | None:
        """``r:raw_value()``: the payload with its CRLF, or nil."""
        return req.value

    @staticmethod
    def flag_token_int(req: Request, flag: bytes):
        """``r:flag_token_int(f)``: (found, number or None)."""
        return rq.flag_int(req, flag[0])

    @staticmethod
    def flag_add(req: Request, flag: bytes, token):
        """``r:flag_add(f, token)``: False if the flag is there already or
        the edited line would not be one request (rq.append_flag); None if
        ``token`` is False (not a string or number: a Lua error, raised
        only after the flag was looked for, as memcached's proxy does)."""
        if rq.find_flag(req, flag) is not None:
            return False
        if token is False:
            return None
        return rq.append_flag(req, flag, token)

    @staticmethod
    def flag_set(req: Request, flag: bytes, new: bytes, token: bytes) -> bool:
        """``r:flag_set(f, token)`` (``new`` is ``f``) and
        ``r:flag_replace(f, new, token)``: the first flag token of ``f``
        becomes ``new + token``, or that is added at the end."""
        index = rq.find_flag(req, flag)
        if index is None:
            return rq.append_flag(req, new, token)
        return rq.render_flag(req, index, new, token)

    @staticmethod
    def flag_del(req: Request, flag: bytes) -> bool:
        """``r:flag_del(f)``: remove the first flag token of ``f``."""
        index = rq.find_flag(req, flag)
        return index is not None and rq.render_flag(req, index, b"", b"")

    @staticmethod
    def match_res(req: Request, res: Response | None):
        """``r:match_res(res)``: (matched, why not); a closed response
        cannot be parsed."""
        if res is None:
            return False, lua_error("failed to parse response")
        matched, why = match_reply(req, res)
        return matched, why and lua_error(why)

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

    @staticmethod
    def raw_string(res: Response | None) -> bytes | None:
        """``res:raw_string()``: the reply's bytes (``raw_reply``); nil
        for a failure or a closed response."""
        return None if res is None else raw_reply(res)

    @staticmethod
    def flag_blank(res: Response | None, flag: bytes) -> bool:
        """``res:flag_blank(f)``: blank a meta reply's flag (``blank_flag``)."""
        return res is not None and blank_flag(res, flag[0])

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

    def log_backend(self, req: Request, res: Response, backend) -> None:
        """A ``proxy_req`` event for a request a V2 handle sent to a backend
        with a ``log`` option, if that option asks for it (BackendLog)."""
        policy = backend.options.log
        if policy.rate == 1 or (policy.errors and not res.ok) \
                or (policy.deadline_us and res.elapsed > policy.deadline_us) \
                or (policy.rate and random.random() * policy.rate < 1):
            self.log_req(req, res, policy.tag.encode(), backend=f"{backend.host}:{backend.port}")

    @staticmethod
    def refusal(index: int):
        """The ``index``-th (from 1) of REFUSED_NAMES, or nothing past the end."""
        if 1 <= index <= len(REFUSED_NAMES):
            name, why = REFUSED_NAMES[index - 1]
            return name.encode(), why.encode()
        return None

    # -- crons and rate limits ---------------------------------------------------

    def register_cron(self, name, table):
        """``mcp.register_cron(name, { every =, rerun =, func = })``."""
        if not isinstance(name, bytes):
            return lua_error("mcp.register_cron: name must be a string")
        if lua_type(table) != "table":
            return lua_error("mcp.register_cron: second argument must be a table")
        try:
            self.crons[text(name)] = make_cron(text(name), table, self.clock.seconds())
        except CronError as e:
            return lua_error(str(e))
        return None

    def schedule_config_reload(self) -> None:
        """``mcp.schedule_config_reload()``: reload once this call is over."""
        if self.schedule_reload is not None:
            self.schedule_reload()

    def ratelim(self, table, what: bytes):
        """A TokenBucket for ``mcp.ratelim_tbf{}`` / ``ratelim_global_tbf{}``."""
        if lua_type(table) != "table":
            return None, lua_error(f"{text(what)}: argument must be a table")
        fields = {text(k): v for k, v in table.items()}
        try:
            return TokenBucket.of(fields, self.now_ms, text(what)), None
        except RateLimitError as e:
            return None, lua_error(str(e))

    def now_ms(self) -> int:
        """The engine's clock in whole milliseconds."""
        return int(self.clock.seconds() * 1000)

    # -- logging, time and tunables ------------------------------------------------

    def log(self, message: bytes) -> None:
        self.logger.info("{msg}", msg=text(message), type="proxy_user")

    def log_req(self, req: Request, res: Response | None, detail: bytes,
                backend: str = "") -> None:
        """An event for ``watch proxyreqs`` (memcached's proxy_req);
        ``backend``: host:port of the backend that answered, if known."""
        self.logger.info(
            "proxy_req {command} key={key!r} status={status} elapsed={elapsed} {detail}",
            type="proxy_req", command=rq.COMMAND_NAMES.get(req.command, "?"),
            key=req.key, status=_status(res), elapsed=res.elapsed if res else 0,
            code=res.code if res else 0, detail=text(detail), backend=backend)

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
