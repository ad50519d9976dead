# cython: language_level=3
"""The hot loops of mcp.lua's start_keys and resume_keys, in C (optional).

Routing the keys of a batch (engine._LuaKeys) costs, per key, a request
table, a coroutine resumed up to its pool call, then a response table and
the coroutine resumed to its end. In Lua the loops that do so were most of
the instructions a key cost beside the route itself (``bench/instructions.py``):
the interpreter's dispatch of their opcodes, and the calls of C functions
(``setmetatable``, ``coroutine.resume``) with their frames and argument
checks. These two Lua C functions do the same through the Lua C API, for
as long as every key takes the common step (its route sent its own lazy
request, unedited, to the batch's one pool; returned the lazy response it
was given); at the first key that does not, they return to the Lua loop
with how far they got and that key's resumed values, and mcp.lua goes on
exactly as it does without them.

lupa links Lua 5.4 into its own extension module and exports its C API;
this module finds those functions there (``dlsym``) rather than linking a
Lua of its own, so both work on the same states. ``install`` puts the two
functions into a Lua state as a table (mcp.lua's ``loops``); it installs
nothing (mcp.lua then keeps its Lua loops) where the functions are not
found or the Lua is not 5.4. The functions never touch Python objects:
lupa runs Lua without the GIL, and a route's calls into Python take it as
they do from Lua.
"""

from libc.stdint cimport uintptr_t


cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD


cdef extern from *:
    """
    typedef struct lua_State lua_State;  /* opaque: only its API is used */
    """
    ctypedef struct lua_State:
        pass

ctypedef long long lua_Integer
ctypedef double lua_Number
ctypedef int (*lua_CFunction)(lua_State *L) noexcept nogil

# Lua 5.4's lua.h: what this module uses of it.
cdef enum:
    LUA_OK = 0
    LUA_YIELD = 1
    LUA_TNIL = 0
    LUA_TSTRING = 4
    LUA_TTABLE = 5
    LUA_TUSERDATA = 7
    LUA_VERSION_NUM = 504

# mcp.lua's: the slots of a lazy request and response.
cdef enum:
    R_KEY = 1
    R_CMD = 2
    R_BATCH = 4
    R_INDEX = 5
    S_OK = 1
    S_HIT = 2
    S_UNIT = 4
    S_POS = 5
    SLOTS = 5

ctypedef lua_Number (*version_f)(lua_State *L) noexcept nogil
ctypedef int (*gettop_f)(lua_State *L) noexcept nogil
ctypedef void (*settop_f)(lua_State *L, int idx) noexcept nogil
ctypedef void (*pushvalue_f)(lua_State *L, int idx) noexcept nogil
ctypedef void (*copy_f)(lua_State *L, int fromidx, int toidx) noexcept nogil
ctypedef int (*checkstack_f)(lua_State *L, int n) noexcept nogil
ctypedef void (*xmove_f)(lua_State *src, lua_State *dst, int n) noexcept nogil
ctypedef int (*type_f)(lua_State *L, int idx) noexcept nogil
ctypedef lua_Integer (*tointegerx_f)(lua_State *L, int idx, int *isnum) noexcept nogil
ctypedef const char *(*tolstring_f)(lua_State *L, int idx, size_t *length) noexcept nogil
ctypedef lua_State *(*tothread_f)(lua_State *L, int idx) noexcept nogil
ctypedef int (*rawequal_f)(lua_State *L, int a, int b) noexcept nogil
ctypedef void (*pushnil_f)(lua_State *L) noexcept nogil
ctypedef void (*pushinteger_f)(lua_State *L, lua_Integer n) noexcept nogil
ctypedef void (*pushboolean_f)(lua_State *L, int b) noexcept nogil
ctypedef const char *(*pushstring_f)(lua_State *L, const char *s) noexcept nogil
ctypedef void (*pushcclosure_f)(lua_State *L, lua_CFunction fn, int n) noexcept nogil
ctypedef int (*rawgeti_f)(lua_State *L, int idx, lua_Integer n) noexcept nogil
ctypedef void (*rawseti_f)(lua_State *L, int idx, lua_Integer n) noexcept nogil
ctypedef void (*createtable_f)(lua_State *L, int narr, int nrec) noexcept nogil
ctypedef void (*setfield_f)(lua_State *L, int idx, const char *k) noexcept nogil
ctypedef void (*setglobal_f)(lua_State *L, const char *name) noexcept nogil
ctypedef int (*setmetatable_f)(lua_State *L, int idx) noexcept nogil
ctypedef lua_State *(*newthread_f)(lua_State *L) noexcept nogil
ctypedef int (*resume_f)(lua_State *L, lua_State *src, int narg, int *nres) noexcept nogil
ctypedef int (*error_f)(lua_State *L) noexcept nogil


cdef struct Api:
    version_f version
    gettop_f gettop
    settop_f settop
    pushvalue_f pushvalue
    copy_f copy
    checkstack_f checkstack
    xmove_f xmove
    type_f type
    tointegerx_f tointegerx
    tolstring_f tolstring
    tothread_f tothread
    rawequal_f rawequal
    pushnil_f pushnil
    pushinteger_f pushinteger
    pushboolean_f pushboolean
    pushstring_f pushstring
    pushcclosure_f pushcclosure
    rawgeti_f rawgeti
    rawseti_f rawseti
    createtable_f createtable
    setfield_f setfield
    setglobal_f setglobal
    setmetatable_f setmetatable
    newthread_f newthread
    resume_f resume
    error_f error

cdef Api lua
#: whether ``lua`` holds every function (found once per process)
cdef bint found = False

_NAMES = ("lua_version", "lua_gettop", "lua_settop", "lua_pushvalue", "lua_copy",
          "lua_checkstack", "lua_xmove", "lua_type", "lua_tointegerx",
          "lua_tolstring", "lua_tothread", "lua_rawequal", "lua_pushnil", "lua_pushinteger",
          "lua_pushboolean", "lua_pushstring", "lua_pushcclosure", "lua_rawgeti", "lua_rawseti",
          "lua_createtable", "lua_setfield", "lua_setglobal", "lua_setmetatable",
          "lua_newthread", "lua_resume", "lua_error")


cdef bint find(bytes library):
    """Fill ``lua`` from the already loaded ``library`` (lupa's module)."""
    cdef void *handle = dlopen(library, RTLD_NOW | RTLD_NOLOAD)
    cdef void *pointers[26]
    cdef int i
    cdef bytes symbol
    if handle == NULL:
        return False
    for i in range(26):
        symbol = _NAMES[i].encode()
        pointers[i] = dlsym(handle, symbol)
        if pointers[i] == NULL:
            return False
    lua.version = <version_f>pointers[0]
    lua.gettop = <gettop_f>pointers[1]
    lua.settop = <settop_f>pointers[2]
    lua.pushvalue = <pushvalue_f>pointers[3]
    lua.copy = <copy_f>pointers[4]
    lua.checkstack = <checkstack_f>pointers[5]
    lua.xmove = <xmove_f>pointers[6]
    lua.type = <type_f>pointers[7]
    lua.tointegerx = <tointegerx_f>pointers[8]
    lua.tolstring = <tolstring_f>pointers[9]
    lua.tothread = <tothread_f>pointers[10]
    lua.rawequal = <rawequal_f>pointers[11]
    lua.pushnil = <pushnil_f>pointers[12]
    lua.pushinteger = <pushinteger_f>pointers[13]
    lua.pushboolean = <pushboolean_f>pointers[14]
    lua.pushstring = <pushstring_f>pointers[15]
    lua.pushcclosure = <pushcclosure_f>pointers[16]
    lua.rawgeti = <rawgeti_f>pointers[17]
    lua.rawseti = <rawseti_f>pointers[18]
    lua.createtable = <createtable_f>pointers[19]
    lua.setfield = <setfield_f>pointers[20]
    lua.setglobal = <setglobal_f>pointers[21]
    lua.setmetatable = <setmetatable_f>pointers[22]
    lua.newthread = <newthread_f>pointers[23]
    lua.resume = <resume_f>pointers[24]
    lua.error = <error_f>pointers[25]
    return True


def install(library: str, state: int, name: bytes) -> bool:
    """Set the global ``name`` of the Lua state at address ``state`` (its
    main thread, as ``string.format("%p", coroutine.running())`` gives it)
    to a table of the two loops, ``start`` and ``resume``; lupa's module
    ``library`` holds the Lua. False, and nothing set, where this Lua is not
    one they can drive. Call it while no Lua runs on the state."""
    global found
    cdef lua_State *L = <lua_State *><uintptr_t>state
    cdef int top
    if not found:
        found = find(library.encode())
        if not found:
            return False
    if <int>lua.version(L) != LUA_VERSION_NUM:
        return False
    top = lua.gettop(L)
    if not lua.checkstack(L, 3):
        return False
    lua.createtable(L, 0, 2)
    lua.pushcclosure(L, start_keys, 0)
    lua.setfield(L, -2, b"start")
    lua.pushcclosure(L, resume_keys, 0)
    lua.setfield(L, -2, b"resume")
    lua.setglobal(L, name)
    lua.settop(L, top)
    return True


cdef inline void pop(lua_State *L, int n) noexcept nogil:
    lua.settop(L, -n - 1)


cdef int fail(lua_State *L, const char *message) noexcept nogil:
    lua.pushstring(L, message)
    return lua.error(L)


cdef int resume(lua_State *L, lua_State *co, int narg, int *nres) noexcept nogil:
    """Resume ``co`` with the ``narg`` values on top of ``L``, as
    ``coroutine.resume`` does, and move to ``L``'s top what it yielded or
    returned (``nres`` values), or its error object (one). The status, or
    -1 where a stack could not grow."""
    cdef int status
    if co == NULL or not lua.checkstack(co, narg):
        return -1
    lua.xmove(L, co, narg)
    status = lua.resume(co, L, narg, nres)
    if status != LUA_OK and status != LUA_YIELD:
        nres[0] = 1
    if not lua.checkstack(L, nres[0] + 12):
        return -1
    lua.xmove(co, L, nres[0])
    return status


cdef int stopped(lua_State *L, bint ok, int results, int nres) noexcept nogil:
    """Push a stopped key's resume as ``coroutine.resume`` returns it, six
    values after ``ok`` (as mcp.lua's loops keep them): the ``nres``
    values from index ``results`` (for an error, the error object)."""
    cdef int k
    lua.pushboolean(L, ok)
    for k in range(6):
        if k < nres:
            lua.pushvalue(L, results + k)
        else:
            lua.pushnil(L)
    return 7


# start(cos, batch, handler, cmd, REQUEST, idle, idle_count, body, kinds,
#       other, other_cmd, count, POOL_CALL): mcp.lua's start_keys loop over the
# `count` keys in `cos` (replaced, as it goes, by their coroutines).
# Returns how many keys sent their own lazy request to one pool, that pool
# (or nil), the idle count; and, if that was not every key, the next key's
# resume (ok and six values).
cdef enum:
    A_COS = 1
    A_BATCH = 2
    A_HANDLER = 3
    A_CMD = 4
    A_REQUEST = 5
    A_IDLE = 6
    A_IDLE_COUNT = 7
    A_BODY = 8
    A_KINDS = 9
    A_OTHER = 10
    A_OTHER_CMD = 11
    A_COUNT = 12
    A_POOL_CALL = 13
    S_POOL = 14  # the pool every key so far sent to (nil: none yet)
    S_REQ = 15  # the key's request table
    S_RESULTS = 16  # the key's resumed values


cdef int start_keys(lua_State *L) noexcept nogil:
    cdef lua_Integer count = lua.tointegerx(L, A_COUNT, NULL)
    cdef lua_Integer idle_count = lua.tointegerx(L, A_IDLE_COUNT, NULL)
    cdef const char *kinds = NULL
    cdef size_t kinds_length = 0
    cdef lua_Integer i
    cdef int route, command, status, nres
    cdef lua_State *co
    if lua.type(L, A_KINDS) == LUA_TSTRING:
        kinds = lua.tolstring(L, A_KINDS, &kinds_length)
    lua.settop(L, A_POOL_CALL)
    lua.pushnil(L)  # S_POOL
    for i in range(count):
        route, command = A_HANDLER, A_CMD
        if kinds != NULL and <size_t>i < kinds_length and kinds[i] == 1:
            route, command = A_OTHER, A_OTHER_CMD
        if not lua.checkstack(L, 12):
            return fail(L, "start_keys: a stack could not grow")
        lua.createtable(L, SLOTS, 0)  # S_REQ: { key, command, nil, batch, i }
        lua.rawgeti(L, A_COS, i + 1)
        lua.rawseti(L, S_REQ, R_KEY)
        lua.pushvalue(L, command)
        lua.rawseti(L, S_REQ, R_CMD)
        lua.pushvalue(L, A_BATCH)
        lua.rawseti(L, S_REQ, R_BATCH)
        lua.pushinteger(L, i)
        lua.rawseti(L, S_REQ, R_INDEX)
        lua.pushvalue(L, A_REQUEST)
        lua.setmetatable(L, S_REQ)
        if idle_count == 0:  # a new coroutine running `body`
            co = lua.newthread(L)
            lua.pushvalue(L, A_BODY)
            lua.xmove(L, co, 1)
        else:
            lua.rawgeti(L, A_IDLE, idle_count)
            co = lua.tothread(L, -1)
            lua.pushnil(L)
            lua.rawseti(L, A_IDLE, idle_count)
            idle_count -= 1
        lua.rawseti(L, A_COS, i + 1)  # the key's coroutine takes its slot
        lua.pushvalue(L, route)
        lua.pushvalue(L, S_REQ)
        status = resume(L, co, 2, &nres)
        if status < 0:
            return fail(L, "start_keys: a stack could not grow")
        if (status == LUA_YIELD and nres == 3 and lua.rawequal(L, S_RESULTS, A_POOL_CALL)
                and lua.type(L, S_RESULTS + 1) == LUA_TUSERDATA
                and lua.rawequal(L, S_RESULTS + 2, S_REQ)
                and lua.rawgeti(L, S_REQ, R_BATCH) != LUA_TNIL
                and lua.rawequal(L, -1, A_BATCH)
                and (lua.type(L, S_POOL) == LUA_TNIL
                     or lua.rawequal(L, S_POOL, S_RESULTS + 1))):
            lua.copy(L, S_RESULTS + 1, S_POOL)
            lua.settop(L, S_POOL)
            continue
        lua.settop(L, S_REQ + nres)
        lua.pushinteger(L, i)
        lua.pushvalue(L, S_POOL)
        lua.pushinteger(L, idle_count)
        return 3 + stopped(L, status == LUA_OK or status == LUA_YIELD, S_RESULTS, nres)
    lua.pushinteger(L, count)
    lua.pushvalue(L, S_POOL)
    lua.pushinteger(L, idle_count)
    return 3


# resume(cos, waiting, count, fetch, flags, RESPONSE, FINISHED, returned,
#        idle, idle_count, idle_max): mcp.lua's resume_keys loop over the
# `count` keys a unit answered (`waiting`, their indexes from 1, or false:
# every key in order). Returns how many keys returned the lazy response
# they were given, the idle count; and, if that was not every key, the
# next key's index and coroutine, and its resume (ok and six values).
cdef enum:
    B_COS = 1
    B_WAITING = 2
    B_COUNT = 3
    B_FETCH = 4
    B_FLAGS = 5
    B_RESPONSE = 6
    B_FINISHED = 7
    B_RETURNED = 8
    B_IDLE = 9
    B_IDLE_COUNT = 10
    B_IDLE_MAX = 11
    T_CO = 12  # the key's coroutine
    T_RES = 13  # its response table
    T_RESULTS = 14  # its resumed values


cdef int resume_keys(lua_State *L) noexcept nogil:
    cdef lua_Integer count = lua.tointegerx(L, B_COUNT, NULL)
    cdef lua_Integer idle_count = lua.tointegerx(L, B_IDLE_COUNT, NULL)
    cdef lua_Integer idle_max = lua.tointegerx(L, B_IDLE_MAX, NULL)
    cdef bint waiting = lua.type(L, B_WAITING) == LUA_TTABLE
    cdef size_t flags_length = 0
    cdef const char *flags = lua.tolstring(L, B_FLAGS, &flags_length)
    cdef lua_Integer j, i
    cdef int status, nres
    cdef char flag
    cdef lua_State *co
    if flags == NULL or flags_length < <size_t>count:
        return fail(L, "resume_keys: a flag per key")
    lua.settop(L, B_IDLE_MAX)
    for j in range(count):
        if not lua.checkstack(L, 12):
            return fail(L, "resume_keys: a stack could not grow")
        if waiting:
            lua.rawgeti(L, B_WAITING, j + 1)
            i = lua.tointegerx(L, -1, NULL)
            pop(L, 1)
        else:
            i = j
        lua.rawgeti(L, B_COS, i + 1)  # T_CO
        co = lua.tothread(L, T_CO)
        flag = flags[j]
        lua.createtable(L, SLOTS, 0)  # T_RES: { ok, hit, nil, fetch, position }
        lua.pushboolean(L, flag > 0)
        lua.rawseti(L, T_RES, S_OK)
        lua.pushboolean(L, flag == 2)
        lua.rawseti(L, T_RES, S_HIT)
        lua.pushvalue(L, B_FETCH)
        lua.rawseti(L, T_RES, S_UNIT)
        lua.pushinteger(L, j)
        lua.rawseti(L, T_RES, S_POS)
        lua.pushvalue(L, B_RESPONSE)
        lua.setmetatable(L, T_RES)
        lua.pushvalue(L, T_RES)
        status = resume(L, co, 1, &nres)
        if status < 0:
            return fail(L, "resume_keys: a stack could not grow")
        # a finished route (only those yield FINISHED) that returned its
        # response, still lazy (S_UNIT is the unit until then)
        if (status == LUA_YIELD and nres == 1 and lua.rawequal(L, T_RESULTS, B_FINISHED)
                and lua.rawgeti(L, B_RETURNED, 1) != LUA_TNIL
                and lua.rawequal(L, -1, T_RES)
                and lua.rawgeti(L, T_RES, S_UNIT) != LUA_TNIL
                and lua.rawequal(L, -1, B_FETCH)):
            lua.pushnil(L)
            lua.rawseti(L, B_RETURNED, 1)  # what mcp.lua's finished(co) does
            if idle_count < idle_max:
                idle_count += 1
                lua.pushvalue(L, T_CO)
                lua.rawseti(L, B_IDLE, idle_count)
            lua.settop(L, B_IDLE_MAX)
            continue
        lua.settop(L, T_RES + nres)
        lua.pushinteger(L, j)
        lua.pushinteger(L, idle_count)
        lua.pushinteger(L, i)
        lua.pushvalue(L, T_CO)
        return 4 + stopped(L, status == LUA_OK or status == LUA_YIELD, T_RESULTS, nres)
    lua.pushinteger(L, count)
    lua.pushinteger(L, idle_count)
    return 2
