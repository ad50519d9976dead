# Cython's declarations for units.py, compiled as it stands (setup.py):
# each kind of unit an extension type whose state is C fields. Keep in step
# with the attributes units.py sets (each class's __slots__).
cimport cython

cdef class Single:
    cdef public object request, done, sent, response, merged


cdef class _MergedGets:
    cdef public object singles, keys, line, values
    cdef public bint complete


cdef class KeyBatch:
    cdef public object name, keys, done, sink, sent, _values, _parts
    cdef public Py_ssize_t size


cdef class KeyFetch:
    cdef public object name, keys, done, sink, sent, items, parts, error, _responses
    cdef public Py_ssize_t size, elapsed


cdef class ReplyRun:
    cdef public object keys, data, sets, widths, done, sink, sent, replies, failure, _responses
    cdef public Py_ssize_t requests, size, elapsed

    @cython.locals(index=Py_ssize_t)
    cpdef Py_ssize_t _left(self, Py_ssize_t read)


cdef class PlainRun:
    cdef public object data, keys, sets, widths, parts, sink, done, sent
    cdef public Py_ssize_t count, size, answered
