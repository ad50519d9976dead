# Cython's declarations for connection.py, compiled as it stands (setup.py):
# the connection an extension type whose state is C fields, the per-reply
# loop (dataReceived) and the per-turn write in C. Keep in step with the
# attributes connection.py sets; IProtocol's (transport, connected) and
# the factory that built it (set by Backend's factory) are fields too.
cimport cython

from mcproxy.backends.latency cimport LatencyWindow
from mcproxy.wire.reader cimport ResponseReader
from mcproxy.writes cimport WriteBatch, send

# the process-wide batch (writes.batch), its fields and methods read in C
cdef WriteBatch batch


@cython.final
cdef class BackendConnection:
    cdef public object owner, queue, _seconds, on_lost, _socket, transport, factory
    cdef public ResponseReader reader
    cdef public list _pending
    cdef public bint keepalive, validating, _batched, receiving
    cdef public Py_ssize_t written
    cdef public double answered_at
    cdef public int connected

    cpdef write(self, unit)
    @cython.locals(count=Py_ssize_t, index=Py_ssize_t)
    cpdef write_pending(self)
    @cython.locals(latency=LatencyWindow, now=cython.double, elapsed=cython.longlong)
    cpdef dataReceived(self, data)
