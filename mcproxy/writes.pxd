# Cython's declarations for writes.py, compiled as it stands (setup.py):
# the batch as an extension type with C fields, the send a C function the
# compiled protocol and backend connection call. Keep in step with the
# attributes writes.py sets.
cdef class WriteBatch:
    cdef public list pending, first
    cdef public Py_ssize_t events
    cdef public bint scheduled
    cdef public object schedule
    cpdef add(self, proto)
    cpdef call_first(self, call)
    cpdef _schedule(self)
    cpdef flush(self)


cpdef send(transport, sock, list buffers)
