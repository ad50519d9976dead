# Cython's declarations for runs.py, compiled as it stands (setup.py): the
# run router an extension type whose config is C fields, its per-request
# methods called in C, the units it makes typed. Keep in step with the
# attributes runs.py sets.
cimport cython

from mcproxy.units cimport PlainRun, ReplyRun


@cython.final
cdef class RunRouter:
    cdef public object engine, stats, tunables, direct, runner
    cdef public list gathered
    cdef public bint lua_runs, gather_sets, gathered_multigets
    cdef public Py_ssize_t gathers, gather_multigets

    cpdef configure(self, direct, runner, bint lua_runs, bint gather_sets, Py_ssize_t gathers,
                    Py_ssize_t gather_multigets=*)
    cpdef bint gather_plain(self, key, sent, bint is_set, done, release, req=*,
                            Py_ssize_t width=*)
    cpdef route_gathered(self)
    cpdef route_each(self, list gathered)
    @cython.locals(index=Py_ssize_t)
    cpdef _route_multiget(self, req, list keys, done)
    @cython.locals(index=Py_ssize_t, unit=ReplyRun)
    cpdef _route_joined(self, list gathered, tuple keys, tuple sents, tuple dones, list sets,
                        widths)
    @cython.locals(stop=Py_ssize_t, requests=Py_ssize_t, run=PlainRun)
    cpdef bint route_run(self, data, Py_ssize_t start, list keys, list ends, list sets, widths,
                         done, sink=*)
    @cython.locals(index=Py_ssize_t, first=Py_ssize_t, last=Py_ssize_t, offset=Py_ssize_t,
                   end=Py_ssize_t, run=PlainRun)
    cpdef bint _route_stretches(self, data, Py_ssize_t start, list keys, list ends, list sets,
                                list chosen, done, sink)


cpdef run_answered(Py_ssize_t requests, stats, done, reply)
@cython.locals(replies=list, index=Py_ssize_t)
cpdef joined_answer(stats, dones, ReplyRun unit)


@cython.final
cdef class RunsReply:
    cdef public list parts
    cdef public Py_ssize_t pending
    cdef public object stats, done

    cpdef answer(self, Py_ssize_t index, Py_ssize_t requests, reply)
