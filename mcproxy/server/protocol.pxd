# Cython's declarations for protocol.py, compiled as it stands (setup.py):
# the slots and the protocol as extension types, their state in C fields,
# the methods of the per-request path called in C. Keep in step with the
# attributes protocol.py sets; anything else a ProxyServerProtocol is given
# (factory, last_active, a dataReceived of its own) lives in its __dict__.
cimport cython

from mcproxy.writes cimport WriteBatch, send

# the process-wide batch (writes.batch), its fields and methods read in C
cdef WriteBatch batch


cdef class Slot:
    cdef public object data
    cdef public ProxyServerProtocol proto
    cpdef fill(self, data)


cdef class PayloadSlot(Slot):
    cdef public Py_ssize_t size
    cpdef fill(self, data)


cdef class GroupSlot(Slot):
    cdef public Py_ssize_t extra, size, credited
    cpdef fill(self, data)


@cython.final
cdef class ProxyServerProtocol:
    cdef dict __dict__
    cdef public object transport, core, router, stats, _seconds, _slots, _buffer
    cdef public object _payload_for, _payload_then, _payload_chunks, _out, _socket, last_active
    cdef public Py_ssize_t _payload_needed, _held, _inflight_bytes, _extra_slots
    cdef public Py_ssize_t _waiting, _unsent, output_limit, _pause_at
    cdef public bint _reading_paused, _writing_paused, _read_closed, _closing, _gone
    cdef public bint _batched
    cdef public int connected

    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, multigets=Py_ssize_t)
    cpdef _process(self, data)
    @cython.locals(gathers=Py_ssize_t)
    cpdef _route(self, req)
    cpdef _release(self)
    @cython.locals(extra=Py_ssize_t, routed=bint, gathers=Py_ssize_t)
    cpdef bint _route_run(self, data, Py_ssize_t start, list keys, list ends, sets, widths)
    @cython.locals(slot=Slot, group=GroupSlot)
    cpdef flush(self)
    @cython.locals(size=Py_ssize_t)
    cpdef write_pending(self)
    cpdef _add_waiting(self, Py_ssize_t size)
    cpdef _output_check(self)
    cpdef _check_inflight(self)
    cpdef _pause_reading(self)
    cpdef _read_buffered(self)
