# Cython's declarations for latency.py, compiled as it stands (setup.py):
# the window an extension type whose ring and counts are C fields, record
# callable in C by the backend connection. Keep in step with __slots__.
cimport cython


@cython.final
cdef class LatencyWindow:
    cdef public list samples
    cdef public long long count, total
    cdef public Py_ssize_t _mask

    @cython.locals(count=cython.longlong, start=Py_ssize_t, stop=Py_ssize_t,
                   first=Py_ssize_t, rest=Py_ssize_t, index=Py_ssize_t)
    cpdef record(self, long long micros, Py_ssize_t times=*)
