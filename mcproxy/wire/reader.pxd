# Cython's declarations for reader.py, compiled as it stands (setup.py): the
# reader an extension type whose buffer and offsets are C fields, its
# per-reply methods called in C. Keep in step with __slots__.
cimport cython


@cython.final
cdef class ResponseReader:
    cdef public bytes _buf
    cdef public Py_ssize_t _pos, _have, _need, _held_next
    cdef public list _parts, _held

    @cython.locals(need=Py_ssize_t, have=Py_ssize_t)
    cpdef bint feed(self, bytes data)
    cpdef read(self, bint version=*, bint multi=*)
    cpdef _wait(self, bytes buf, Py_ssize_t pos, Py_ssize_t need)
    @cython.locals(start=Py_ssize_t, pos=Py_ssize_t, framed=Py_ssize_t, size=Py_ssize_t,
                   index=Py_ssize_t, end=Py_ssize_t)
    cpdef Py_ssize_t read_raw(self, Py_ssize_t count, list parts, list keys, sets=*, widths=*,
                              Py_ssize_t first=*) except -1
    @cython.locals(read=Py_ssize_t, parts=list)
    cpdef Py_ssize_t read_each(self, Py_ssize_t count, list replies, list keys,
                               sets, widths=*) except -1
