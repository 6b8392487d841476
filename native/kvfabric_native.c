/*
 * kvfabric._native: copy block bytes and compute their XXH3-64 checksum in one pass.
 *
 * Every function here has a pure-Python twin in kvfabric/integrity.py (``*_ref``)
 * that defines its result; this module must return exactly the same values.
 *
 * A single block copy is not here: for one large block, numpy's copy plus the
 * xxhash package's AVX2 hash is as fast (kvfabric bench tiers, docs/benchmarks.md),
 * so only the batched paths, which save per-block Python overhead, are native,
 * and the two ends of a streamed Get, where a separate hashing pass would sit
 * on the critical path of the stream.
 *
 *   copy_many_with_checksum(dsts, srcs) -> list[int]
 *   gather_with_checksum(arena, offsets, size, dst) -> list[int]
 *   scatter_with_checksum(src, arena, offsets, size) -> list[int]
 *   encode_chunks_with_checksum(block_index, block, chunk_bytes, trailer) -> (list[bytes], int)
 *   StreamingChecksum(): .copy(dst, src), .intdigest() -> int   (a block in pieces)
 *
 * Buffers are taken through the buffer protocol (bytes, bytearray, memoryview,
 * numpy arrays, mmap, ...): sources with PyBUF_SIMPLE, destinations with
 * PyBUF_WRITABLE, and both must be C-contiguous. Arguments are fully validated
 * (with the GIL held) before any byte is written, so a call that raises leaves
 * every destination untouched. All copying and hashing runs with the GIL
 * released (by StreamingChecksum.copy: for pieces of KVF_GIL_FREE_MIN or more).
 *
 * Checksum: XXH3-64, seed 0, from the vendored single-header xxHash v0.8.4
 * (native/third_party/, BSD-2-Clause), identical to ``xxhash.xxh3_64_intdigest``.
 * Large copies are processed in cache-sized chunks: each chunk is copied and
 * then fed to the streaming XXH3 state while it is still hot in L1/L2, so the
 * bytes cross the memory bus once (see "Two copy strategies" below).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdint.h>
#include <string.h>

/* Header-only xxHash: every XXH function is compiled into this unit
 * (XXH_INLINE_ALL). No -march flags: the baseline build uses SSE2 on x86_64.
 *
 * On x86 with GCC/Clang we also compile xxHash's own runtime dispatcher
 * (third_party/xxh_x86dispatch.c, which defines XXH_INLINE_ALL and includes
 * xxhash.h itself): it builds the XXH3 long-input loops for SSE2, AVX2 and
 * AVX-512 with per-function target attributes and picks one once via CPUID at
 * load time. That is what the `xxhash` Python package does too, so the
 * reference hashes at AVX2 speed; without it the native path would hash at SSE2
 * speed. All variants return bit-identical values. Its global symbols are made
 * hidden so they never interpose with another module's copy of xxHash.
 * Build with -DKVF_XXH_DISPATCH=0 to use the plain SSE2 build. */
#ifndef KVF_XXH_DISPATCH
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define KVF_XXH_DISPATCH 1
#else
#define KVF_XXH_DISPATCH 0
#endif
#endif

#if KVF_XXH_DISPATCH
#pragma GCC visibility push(hidden)
#include "xxh_x86dispatch.c"
#pragma GCC visibility pop
#define KVF_XXH3_64(p, n) XXH3_64bits_dispatch((p), (n))
#define KVF_XXH3_UPDATE(st, p, n) XXH3_64bits_update_dispatch((st), (p), (n))
#else
#define XXH_INLINE_ALL
#include "xxhash.h"
#define KVF_XXH3_64(p, n) XXH3_64bits((p), (n))
#define KVF_XXH3_UPDATE(st, p, n) XXH3_64bits_update((st), (p), (n))
#endif

/* Two copy strategies, both one pass over the bytes in chunks:
 *
 *  - cached: memcpy a chunk, then hash the chunk just written while it is hot
 *    in L1/L2. The destination ends up in cache.
 *  - streaming (x86 SSE2 only): copy a chunk with non-temporal stores, then hash
 *    the source chunk, which the copy just pulled into L1. The destination
 *    bypasses the cache, so the copy needs no read-for-ownership of the
 *    destination lines and evicts nothing useful: on memory-bound moves
 *    (blocks that are not cache-resident, the common case for tier moves) this
 *    was ~1.5x faster than the cached strategy on Zen 3, and on par when the
 *    source is cache-resident.
 *
 * A call uses streaming stores when the total bytes it moves reach
 * KVF_NT_THRESHOLD (so small, probably cache-resident moves keep their
 * destination in cache). Both are overridable at build time:
 * -DKVF_NT_THRESHOLD=-1 never streams, 0 always streams. */
#ifndef KVF_CHUNK
#define KVF_CHUNK (64 * 1024)    /* cached strategy: chunk in L2 (16-256 KiB within noise) */
#endif
#ifndef KVF_NT_CHUNK
#define KVF_NT_CHUNK (16 * 1024) /* streaming strategy: source chunk stays in L1 for the hash */
#endif
#ifndef KVF_NT_THRESHOLD
#define KVF_NT_THRESHOLD (1024 * 1024)
#endif
#ifndef KVF_GIL_FREE_MIN
#define KVF_GIL_FREE_MIN (64 * 1024) /* StreamingChecksum.copy: smaller pieces keep the GIL */
#endif

#ifndef KVF_HAVE_NT
#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__))
#define KVF_HAVE_NT 1
#else
#define KVF_HAVE_NT 0
#endif
#endif
#if KVF_HAVE_NT
#include <emmintrin.h>
#endif

/* Does a call moving `total` bytes use streaming stores? */
static int
use_streaming(size_t total)
{
#if KVF_HAVE_NT
    static const long long threshold = KVF_NT_THRESHOLD;
    return threshold >= 0 && (unsigned long long)total >= (unsigned long long)threshold;
#else
    (void)total;
    return 0;
#endif
}

#if KVF_HAVE_NT
/* memcpy with non-temporal (cache-bypassing) 16-byte stores. The caller must
 * issue _mm_sfence() before the destination is handed to anyone else. */
static void
copy_stream(char *dst, const char *src, size_t n)
{
    size_t head = (size_t)((16 - ((uintptr_t)dst & 15)) & 15);
    if (head > n) {
        head = n;
    }
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 48));
        _mm_stream_si128((__m128i *)(void *)(dst + i), a);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 48), d);
    }
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        _mm_stream_si128((__m128i *)(void *)(dst + i), a);
    }
    memcpy(dst + i, src + i, n - i);
}
#endif

/* Make streaming stores globally visible before the GIL is re-acquired. */
static void
streaming_fence(int streaming)
{
#if KVF_HAVE_NT
    if (streaming) {
        _mm_sfence();
    }
#else
    (void)streaming;
#endif
}

/* ------------------------------------------------------------------------- */
/* Core: copy n bytes src -> dst and hash them. GIL not needed.               */
/* ------------------------------------------------------------------------- */

/* Copy n bytes src -> dst (non-overlapping) and feed them to `state`, chunk by
 * chunk, so each chunk is hashed while it is still in cache. */
static void
copy_update(XXH3_state_t *state, char *dst, const char *src, size_t n, int streaming)
{
#if KVF_HAVE_NT
    if (streaming) {
        for (size_t off = 0; off < n;) {
            size_t c = n - off < KVF_NT_CHUNK ? n - off : KVF_NT_CHUNK;
            copy_stream(dst + off, src + off, c);
            /* Hash the source chunk the copy just pulled into L1. */
            (void)KVF_XXH3_UPDATE(state, src + off, c);
            off += c;
        }
        return;
    }
#else
    (void)streaming;
#endif
    for (size_t off = 0; off < n;) {
        size_t c = n - off < KVF_CHUNK ? n - off : KVF_CHUNK;
        memcpy(dst + off, src + off, c);
        /* Hash the chunk just written while it is hot in cache. (Hashing the
         * source chunk first and then copying it out of cache was ~10% faster
         * when the source is cache-resident, ~10% slower on memory-bound moves.) */
        (void)KVF_XXH3_UPDATE(state, dst + off, c);
        off += c;
    }
}

/* Copy n bytes src -> dst and return XXH3-64 of them. */
static uint64_t
copy_hash(char *dst, const char *src, size_t n, int streaming)
{
    static const char empty[1] = {0};

    if (n == 0) {
        return (uint64_t)KVF_XXH3_64(empty, 0);
    }
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    if (d < s + n && s < d + n) {
        /* Overlapping ranges: the reference copies with memmove semantics
         * (np.copyto) and then hashes the source range as it is *after* the copy. */
        memmove(dst, src, n);
        return (uint64_t)KVF_XXH3_64(src, n);
    }
    /* One chunk's worth: copy it, then hash it in one shot. */
#if KVF_HAVE_NT
    if (streaming && n <= KVF_NT_CHUNK) {
        copy_stream(dst, src, n);
        return (uint64_t)KVF_XXH3_64(src, n);
    }
#endif
    if ((!streaming || !KVF_HAVE_NT) && n <= KVF_CHUNK) {
        memcpy(dst, src, n);
        return (uint64_t)KVF_XXH3_64(dst, n);
    }
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    (void)XXH3_64bits_reset(&state);
    copy_update(&state, dst, src, n, streaming);
    return (uint64_t)XXH3_64bits_digest(&state);
}

/* ------------------------------------------------------------------------- */
/* Argument helpers                                                            */
/* ------------------------------------------------------------------------- */

/* Raise `exc_type` with a formatted message. If an exception is pending it
 * becomes the new one's __cause__ and its text is appended in parentheses. */
static void
raise_from_current(PyObject *exc_type, const char *fmt, ...)
{
    PyObject *ctype = NULL, *cval = NULL, *ctb = NULL;
    PyErr_Fetch(&ctype, &cval, &ctb);
    if (ctype != NULL) {
        PyErr_NormalizeException(&ctype, &cval, &ctb);
        if (ctb != NULL && cval != NULL) {
            PyException_SetTraceback(cval, ctb);
        }
    }

    va_list vargs;
    va_start(vargs, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, vargs);
    va_end(vargs);
    if (msg != NULL && cval != NULL) {
        PyObject *full = PyUnicode_FromFormat("%U (%S)", msg, cval);
        Py_DECREF(msg);
        msg = full;
    }
    if (msg != NULL) {
        PyErr_SetObject(exc_type, msg);
        Py_DECREF(msg);
    }

    if (cval != NULL) {
        PyObject *ntype = NULL, *nval = NULL, *ntb = NULL;
        PyErr_Fetch(&ntype, &nval, &ntb);
        PyErr_NormalizeException(&ntype, &nval, &ntb);
        if (nval != NULL) {
            Py_INCREF(cval);
            PyException_SetCause(nval, cval); /* steals the new reference */
            Py_INCREF(cval);
            PyException_SetContext(nval, cval); /* steals the new reference */
        }
        PyErr_Restore(ntype, nval, ntb);
    }
    Py_XDECREF(ctype);
    Py_XDECREF(cval);
    Py_XDECREF(ctb);
}

/* Minimal METH_FASTCALL|METH_KEYWORDS parser: all parameters required,
 * positional-or-keyword. Fills out[0..nparams) with borrowed references. */
static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           const char *const *names, Py_ssize_t nparams, PyObject **out)
{
    for (Py_ssize_t i = 0; i < nparams; i++) {
        out[i] = NULL;
    }
    if (nargs > nparams) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     fname, nparams, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = args[i];
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t j = 0;
            for (; j < nparams; j++) {
                if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0) {
                    break;
                }
            }
            if (j == nparams) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, key);
                return -1;
            }
            if (out[j] != NULL) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                             fname, names[j]);
                return -1;
            }
            out[j] = args[nargs + k];
        }
    }
    for (Py_ssize_t i = 0; i < nparams; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %zd)",
                         fname, names[i], i + 1);
            return -1;
        }
    }
    return 0;
}

/* Acquire a C-contiguous byte buffer. `index` >= 0 names an element of a
 * sequence argument ("dsts[3]"). On failure raises TypeError and leaves `view`
 * unacquired. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *fname, const char *argname,
           Py_ssize_t index)
{
    char label[96];
    if (index >= 0) {
        PyOS_snprintf(label, sizeof(label), "%s[%zd]", argname, index);
    }
    else {
        PyOS_snprintf(label, sizeof(label), "%s", argname);
    }

    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "%s(): %s must be a %sbytes-like object (buffer protocol), not '%.200s'",
                     fname, label, writable ? "writable " : "", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_ValueError) ||
            PyErr_ExceptionMatches(PyExc_TypeError)) {
            raise_from_current(PyExc_TypeError,
                               "%s(): %s must be a %sC-contiguous bytes-like object, "
                               "got '%.200s'",
                               fname, label, writable ? "writable " : "",
                               Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a C-contiguous buffer", fname, label);
        return -1;
    }
    if (writable && view->readonly) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a writable bytes-like object", fname,
                     label);
        return -1;
    }
    return 0;
}

/* An int (anything with __index__) in lo..hi; errors name the argument. */
static int
parse_int_in(PyObject *obj, const char *fname, const char *name, Py_ssize_t lo, Py_ssize_t hi,
             Py_ssize_t *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            raise_from_current(PyExc_TypeError, "%s(): %s must be an int, not '%.200s'", fname,
                               name, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(idx);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s(): %s %R is out of range", fname, name, idx);
        }
        Py_DECREF(idx);
        return -1;
    }
    Py_DECREF(idx);
    if (v < lo) {
        PyErr_Format(PyExc_ValueError, "%s(): %s must be >= %zd, got %zd", fname, name, lo, v);
        return -1;
    }
    if (v > hi) {
        PyErr_Format(PyExc_ValueError, "%s(): %s must be <= %zd, got %zd", fname, name, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

/* Integer element format of a 1-d buffer usable as offsets: returns 1 for
 * signed, 0 for unsigned, -1 if unsupported. */
static int
int_format_signedness(const char *fmt)
{
    if (fmt == NULL) {
        return 0; /* plain bytes: unsigned char */
    }
    if (*fmt == '@' || *fmt == '=') {
        fmt++;
    }
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<') {
        fmt++;
    }
#else
    else if (*fmt == '>' || *fmt == '!') {
        fmt++;
    }
#endif
    if (fmt[0] == '\0' || fmt[1] != '\0') {
        return -1;
    }
    switch (fmt[0]) {
        case 'b': case 'h': case 'i': case 'l': case 'q': case 'n':
            return 1;
        case 'B': case 'H': case 'I': case 'L': case 'Q': case 'N':
            return 0;
        default:
            return -1;
    }
}

/* Offsets from an integer buffer (e.g. a 1-d numpy int64 array). Returns 1 on
 * success, 0 if `obj` is not a suitable buffer (caller falls back to iteration),
 * -1 on error. */
static int
offsets_from_buffer(PyObject *obj, const char *fname, Py_ssize_t **out, Py_ssize_t *count)
{
    Py_buffer v;
    if (!PyObject_CheckBuffer(obj)) {
        return 0;
    }
    if (PyObject_GetBuffer(obj, &v, PyBUF_FORMAT | PyBUF_ND) < 0) {
        PyErr_Clear();
        return 0;
    }
    int is_signed = int_format_signedness(v.format);
    Py_ssize_t isz = v.itemsize;
    if (v.ndim != 1 || is_signed < 0 ||
        !(isz == 1 || isz == 2 || isz == 4 || isz == 8) || v.len % isz != 0) {
        PyBuffer_Release(&v);
        return 0;
    }
    Py_ssize_t n = v.len / isz;
    Py_ssize_t *offs = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    if (offs == NULL) {
        PyBuffer_Release(&v);
        PyErr_NoMemory();
        return -1;
    }
    const char *p = (const char *)v.buf;
    for (Py_ssize_t i = 0; i < n; i++, p += isz) {
        int64_t sv = 0;
        uint64_t uv = 0;
        int big = 0;
        if (is_signed) {
            switch (isz) {
                case 1: { int8_t t; memcpy(&t, p, 1); sv = t; break; }
                case 2: { int16_t t; memcpy(&t, p, 2); sv = t; break; }
                case 4: { int32_t t; memcpy(&t, p, 4); sv = t; break; }
                default: { int64_t t; memcpy(&t, p, 8); sv = t; break; }
            }
        }
        else {
            switch (isz) {
                case 1: { uint8_t t; memcpy(&t, p, 1); uv = t; break; }
                case 2: { uint16_t t; memcpy(&t, p, 2); uv = t; break; }
                case 4: { uint32_t t; memcpy(&t, p, 4); uv = t; break; }
                default: { uint64_t t; memcpy(&t, p, 8); uv = t; break; }
            }
            if (uv > (uint64_t)PY_SSIZE_T_MAX) {
                big = 1;
            }
            sv = (int64_t)uv;
        }
        if (big || sv > (int64_t)PY_SSIZE_T_MAX || sv < -(int64_t)PY_SSIZE_T_MAX) {
            PyMem_Free(offs);
            PyBuffer_Release(&v);
            PyErr_Format(PyExc_ValueError, "%s(): offsets[%zd] is out of range", fname, i);
            return -1;
        }
        offs[i] = (Py_ssize_t)sv;
    }
    PyBuffer_Release(&v);
    *out = offs;
    *count = n;
    return 1;
}

/* offsets: an iterable of ints, or a 1-d integer buffer. Returns a PyMem
 * array (caller frees) and its length, or NULL with an exception set. */
static Py_ssize_t *
parse_offsets(PyObject *obj, const char *fname, Py_ssize_t *count)
{
    Py_ssize_t *offs = NULL;
    int r = offsets_from_buffer(obj, fname, &offs, count);
    if (r < 0) {
        return NULL;
    }
    if (r > 0) {
        return offs;
    }

    PyObject *seq = PySequence_Fast(obj, "offsets must be an iterable of ints");
    if (seq == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            raise_from_current(PyExc_TypeError,
                               "%s(): offsets must be an iterable of ints, not '%.200s'", fname,
                               Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    offs = PyMem_New(Py_ssize_t, n > 0 ? n : 1);
    if (offs == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        Py_ssize_t v;
        if (PyLong_CheckExact(item)) {
            v = PyLong_AsSsize_t(item);
        }
        else {
            PyObject *idx = PyNumber_Index(item);
            if (idx == NULL) {
                if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    raise_from_current(PyExc_TypeError,
                                       "%s(): offsets[%zd] must be an int, not '%.200s'", fname,
                                       i, Py_TYPE(item)->tp_name);
                }
                goto fail;
            }
            v = PyLong_AsSsize_t(idx);
            Py_DECREF(idx);
        }
        if (v == -1 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "%s(): offsets[%zd] = %R is out of range", fname,
                             i, item);
            }
            goto fail;
        }
        offs[i] = v;
    }
    Py_DECREF(seq);
    *count = n;
    return offs;

fail:
    PyMem_Free(offs);
    Py_DECREF(seq);
    return NULL;
}

/* Each slot [off, off+size) must lie inside a buffer of `limit` bytes. */
static int
check_offsets(const Py_ssize_t *offs, Py_ssize_t n, Py_ssize_t size, Py_ssize_t limit,
              const char *fname, const char *bufname)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t off = offs[i];
        if (off < 0 || size > limit || off > limit - size) {
            PyErr_Format(PyExc_ValueError,
                         "%s(): offsets[%zd] = %zd is out of range: slot [%zd, %zd + %zd) must lie "
                         "within %s of %zd bytes",
                         fname, i, off, off, off, size, bufname, limit);
            return -1;
        }
    }
    return 0;
}

/* len(offsets) * size, or -1 with ValueError on overflow. */
static Py_ssize_t
slots_total(Py_ssize_t n, Py_ssize_t size, const char *fname)
{
    if (size > 0 && n > PY_SSIZE_T_MAX / size) {
        PyErr_Format(PyExc_ValueError, "%s(): len(offsets) * size overflows (%zd * %zd)", fname,
                     n, size);
        return -1;
    }
    return n * size;
}

static PyObject *
sums_to_list(const uint64_t *sums, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong((unsigned long long)sums[i]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* ------------------------------------------------------------------------- */
/* copy_many_with_checksum(dsts, srcs) -> list[int]                            */
/* ------------------------------------------------------------------------- */

PyDoc_STRVAR(copy_many_with_checksum_doc,
"copy_many_with_checksum($module, /, dsts, srcs)\n"
"--\n"
"\n"
"Copy srcs[i] into dsts[i] (equal lengths) over two equal-length sequences\n"
"of buffers, returning XXH3-64 (seed 0) of each. All\n"
"buffers are validated before anything is copied; all copies run in one\n"
"GIL-released section. Returns the list of checksums.");

static PyObject *
copy_many_with_checksum(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    static const char *const fname = "copy_many_with_checksum";
    static const char *const names[] = {"dsts", "srcs"};
    PyObject *a[2];
    PyObject *dseq = NULL, *sseq = NULL, *result = NULL;
    Py_buffer *views = NULL; /* views[2*i] = dst i, views[2*i+1] = src i */
    uint64_t *sums = NULL;
    Py_ssize_t n = 0, acquired = 0;

    if (parse_args(fname, args, nargs, kwnames, names, 2, a) < 0) {
        return NULL;
    }
    dseq = PySequence_Fast(a[0], "copy_many_with_checksum(): dsts must be an iterable of buffers");
    if (dseq == NULL) {
        return NULL;
    }
    sseq = PySequence_Fast(a[1], "copy_many_with_checksum(): srcs must be an iterable of buffers");
    if (sseq == NULL) {
        goto done;
    }
    n = PySequence_Fast_GET_SIZE(dseq);
    if (PySequence_Fast_GET_SIZE(sseq) != n) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): dsts and srcs must have the same length, got %zd and %zd", fname, n,
                     PySequence_Fast_GET_SIZE(sseq));
        goto done;
    }
    views = PyMem_New(Py_buffer, 2 * n + 1);
    sums = PyMem_New(uint64_t, n + 1);
    if (views == NULL || sums == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject **ditems = PySequence_Fast_ITEMS(dseq);
    PyObject **sitems = PySequence_Fast_ITEMS(sseq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (get_buffer(ditems[i], &views[2 * i], 1, fname, "dsts", i) < 0) {
            goto done;
        }
        acquired++;
        if (get_buffer(sitems[i], &views[2 * i + 1], 0, fname, "srcs", i) < 0) {
            goto done;
        }
        acquired++;
        if (views[2 * i].len != views[2 * i + 1].len) {
            PyErr_Format(PyExc_ValueError,
                         "%s(): dsts[%zd] has %zd bytes but srcs[%zd] has %zd bytes "
                         "(lengths must be equal)",
                         fname, i, views[2 * i].len, i, views[2 * i + 1].len);
            goto done;
        }
    }

    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += (size_t)views[2 * i].len;
    }
    int streaming = use_streaming(total);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        sums[i] = copy_hash((char *)views[2 * i].buf, (const char *)views[2 * i + 1].buf,
                            (size_t)views[2 * i].len, streaming);
    }
    streaming_fence(streaming);
    Py_END_ALLOW_THREADS

    result = sums_to_list(sums, n);

done:
    for (Py_ssize_t k = 0; k < acquired; k++) {
        PyBuffer_Release(&views[k]);
    }
    PyMem_Free(views);
    PyMem_Free(sums);
    Py_XDECREF(sseq);
    Py_XDECREF(dseq);
    return result;
}

/* ------------------------------------------------------------------------- */
/* gather_with_checksum(arena, offsets, size, dst) -> list[int]                */
/* ------------------------------------------------------------------------- */

PyDoc_STRVAR(gather_with_checksum_doc,
"gather_with_checksum($module, /, arena, offsets, size, dst)\n"
"--\n"
"\n"
"Copy slot i = arena[off:off+size] (off = offsets[i]) into\n"
"dst[i*size:(i+1)*size]; dst must hold exactly len(offsets)*size bytes and every\n"
"slot must lie inside arena. ``offsets`` is an iterable of ints or a 1-d integer\n"
"buffer (e.g. a numpy int64 array). Returns the checksum of each slot.");

/*
 * Gather and scatter are one operation in two directions: copy len(offsets)
 * slots of ``size`` bytes between a contiguous buffer and arena slots, with a
 * checksum per slot. ``to_arena`` = 0 gathers (arena -> contiguous ``dst``),
 * 1 scatters (contiguous ``src`` -> arena). Buffers are acquired and checked
 * in argument order, so errors name the same argument as before.
 */
static PyObject *
slots_with_checksum(const char *fname, PyObject *first, PyObject *second, PyObject *offsets_obj,
                    PyObject *size_obj, int to_arena)
{
    /* gather(arena, offsets, size, dst); scatter(src, arena, offsets, size) */
    const char *flat_name = to_arena ? "src" : "dst";
    Py_ssize_t size, n = 0, total;
    Py_ssize_t *offs = NULL;
    uint64_t *sums = NULL;
    Py_buffer bufs[2], *arena, *flat;
    int acquired = 0;
    PyObject *result = NULL;

    if (parse_int_in(size_obj, fname, "size", 0, PY_SSIZE_T_MAX, &size) < 0) {
        return NULL;
    }
    offs = parse_offsets(offsets_obj, fname, &n);
    if (offs == NULL) {
        return NULL;
    }
    /* first argument: read-only; second: writable (gather writes dst, scatter the arena) */
    if (get_buffer(first, &bufs[0], 0, fname, to_arena ? "src" : "arena", -1) < 0) {
        goto done;
    }
    acquired = 1;
    if (get_buffer(second, &bufs[1], 1, fname, to_arena ? "arena" : "dst", -1) < 0) {
        goto done;
    }
    acquired = 2;
    arena = to_arena ? &bufs[1] : &bufs[0];
    flat = to_arena ? &bufs[0] : &bufs[1];
    total = slots_total(n, size, fname);
    if (total < 0) {
        goto done;
    }
    if (flat->len != total) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): %s has %zd bytes, expected len(offsets) * size = %zd * %zd = %zd",
                     fname, flat_name, flat->len, n, size, total);
        goto done;
    }
    if (check_offsets(offs, n, size, arena->len, fname, "arena") < 0) {
        goto done;
    }
    sums = PyMem_New(uint64_t, n + 1);
    if (sums == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    int streaming = use_streaming((size_t)total);
    Py_BEGIN_ALLOW_THREADS
    char *a = (char *)arena->buf;
    char *f = (char *)flat->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        sums[i] = to_arena
            ? copy_hash(a + offs[i], f + i * size, (size_t)size, streaming)
            : copy_hash(f + i * size, a + offs[i], (size_t)size, streaming);
    }
    streaming_fence(streaming);
    Py_END_ALLOW_THREADS

    result = sums_to_list(sums, n);

done:
    for (int k = acquired - 1; k >= 0; k--) {
        PyBuffer_Release(&bufs[k]);
    }
    PyMem_Free(sums);
    PyMem_Free(offs);
    return result;
}

static PyObject *
gather_with_checksum(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    static const char *const names[] = {"arena", "offsets", "size", "dst"};
    PyObject *a[4];

    if (parse_args("gather_with_checksum", args, nargs, kwnames, names, 4, a) < 0) {
        return NULL;
    }
    return slots_with_checksum("gather_with_checksum", a[0], a[3], a[1], a[2], 0);
}

/* ------------------------------------------------------------------------- */
/* scatter_with_checksum(src, arena, offsets, size) -> list[int]               */
/* ------------------------------------------------------------------------- */

PyDoc_STRVAR(scatter_with_checksum_doc,
"scatter_with_checksum($module, /, src, arena, offsets, size)\n"
"--\n"
"\n"
"Copy src[i*size:(i+1)*size] into slot arena[off:off+size] (off = offsets[i]);\n"
"src must hold exactly len(offsets)*size bytes, arena must be writable and every\n"
"slot must lie inside it. Slots are written in order. Returns the checksum of\n"
"each slot.");

static PyObject *
scatter_with_checksum(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    static const char *const names[] = {"src", "arena", "offsets", "size"};
    PyObject *a[4];

    if (parse_args("scatter_with_checksum", args, nargs, kwnames, names, 4, a) < 0) {
        return NULL;
    }
    return slots_with_checksum("scatter_with_checksum", a[0], a[1], a[2], a[3], 1);
}

/* ------------------------------------------------------------------------- */
/* encode_chunks_with_checksum(block_index, block, chunk_bytes, trailer)        */
/* ------------------------------------------------------------------------- */

PyDoc_STRVAR(encode_chunks_with_checksum_doc,
"encode_chunks_with_checksum($module, /, block_index, block, chunk_bytes, trailer)\n"
"--\n"
"\n"
"Serialize block[off:off+chunk_bytes] for off = 0, chunk_bytes, ... as\n"
"GetChunk{data: BlockData{block_index, offset, data}} messages (protobuf wire\n"
"format, byte-identical to kvfabric.rpc.chunks.encode_data_chunk) and return\n"
"(messages, XXH3-64 of the whole block). The bytes of `trailer` (other\n"
"serialized GetChunk fields, e.g. the block's header) end the first message,\n"
"where the generated classes put a field numbered above 2. Every payload byte is read once: it is copied into its message and\n"
"hashed in the same pass, with the GIL released. block_index must be in\n"
"0..2**32-1, chunk_bytes >= 1.");

/* Bytes a protobuf varint of v takes. */
static size_t
varint_len(uint64_t v)
{
    size_t n = 1;
    while (v > 0x7F) {
        v >>= 7;
        n++;
    }
    return n;
}

static char *
put_varint(char *p, uint64_t v)
{
    while (v > 0x7F) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

/* Length of the serialized GetChunk{data: BlockData{index, offset, c bytes}}
 * before its payload; the header bytes are written to `out` if it is not NULL.
 * proto3 leaves zero scalars out: a zero index or offset takes no bytes. */
static size_t
data_chunk_header(char *out, uint64_t index, uint64_t offset, size_t c)
{
    char buf[48];
    char *p = buf;
    if (index) {
        *p++ = 0x08;
        p = put_varint(p, index);
    }
    if (offset) {
        *p++ = 0x10;
        p = put_varint(p, offset);
    }
    *p++ = 0x1a;
    p = put_varint(p, c);
    size_t inner = (size_t)(p - buf);
    size_t head = 1 + varint_len(inner + c) + inner;
    if (out != NULL) {
        out[0] = 0x12;
        char *q = put_varint(out + 1, inner + c);
        memcpy(q, buf, inner);
    }
    return head;
}

static PyObject *
encode_chunks_with_checksum(PyObject *Py_UNUSED(module), PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const fname = "encode_chunks_with_checksum";
    static const char *const names[] = {"block_index", "block", "chunk_bytes", "trailer"};
    PyObject *a[4];
    PyObject *msgs = NULL, *result = NULL;
    Py_buffer block, trailer;
    Py_ssize_t index, chunk, count;
    char **dsts = NULL;

    if (parse_args(fname, args, nargs, kwnames, names, 4, a) < 0) {
        return NULL;
    }
    /* block_index is a uint32 in the proto; chunk_bytes >= 1 so the loop ends. */
    const Py_ssize_t max_index = PY_SSIZE_T_MAX < 0xFFFFFFFFLL ? PY_SSIZE_T_MAX : 0xFFFFFFFFLL;
    if (parse_int_in(a[0], fname, "block_index", 0, max_index, &index) < 0 ||
        parse_int_in(a[2], fname, "chunk_bytes", 1, PY_SSIZE_T_MAX, &chunk) < 0) {
        return NULL;
    }
    if (get_buffer(a[1], &block, 0, fname, "block", -1) < 0) {
        return NULL;
    }
    if (get_buffer(a[3], &trailer, 0, fname, "trailer", -1) < 0) {
        PyBuffer_Release(&block);
        return NULL;
    }

    /* Allocate every message and write its header with the GIL held; the
     * payloads are filled below without it (no other thread can see them yet). */
    count = block.len / chunk + (block.len % chunk != 0);
    msgs = PyList_New(count);
    dsts = PyMem_New(char *, count + 1);
    if (msgs == NULL || dsts == NULL) {
        if (dsts == NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t off = (size_t)i * (size_t)chunk;
        size_t c = (size_t)block.len - off < (size_t)chunk ? (size_t)block.len - off
                                                              : (size_t)chunk;
        size_t tail = i == 0 ? (size_t)trailer.len : 0;
        size_t head = data_chunk_header(NULL, (uint64_t)index, off, c);
        PyObject *m = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(head + c + tail));
        if (m == NULL) {
            goto done;
        }
        PyList_SET_ITEM(msgs, i, m);
        (void)data_chunk_header(PyBytes_AS_STRING(m), (uint64_t)index, off, c);
        dsts[i] = PyBytes_AS_STRING(m) + head;
        memcpy(dsts[i] + c, trailer.buf, tail);
    }

    uint64_t digest;
    Py_BEGIN_ALLOW_THREADS
    /* Cached stores, not streaming ones: gRPC copies each message again as
     * soon as it is sent, and streaming stores measured no faster
     * (docs/benchmarks.md, rpc). */
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    (void)XXH3_64bits_reset(&state);
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t off = (size_t)i * (size_t)chunk;
        size_t c = (size_t)block.len - off < (size_t)chunk ? (size_t)block.len - off
                                                              : (size_t)chunk;
        copy_update(&state, dsts[i], (const char *)block.buf + off, c, 0);
    }
    digest = (uint64_t)XXH3_64bits_digest(&state);
    Py_END_ALLOW_THREADS

    result = Py_BuildValue("(OK)", msgs, (unsigned long long)digest);

done:
    Py_XDECREF(msgs);
    PyMem_Free(dsts);
    PyBuffer_Release(&trailer);
    PyBuffer_Release(&block);
    return result;
}

/* ------------------------------------------------------------------------- */
/* StreamingChecksum: copy(dst, src), intdigest()                              */
/* ------------------------------------------------------------------------- */

PyDoc_STRVAR(streaming_checksum_doc,
"StreamingChecksum()\n"
"--\n"
"\n"
"XXH3-64 (seed 0) of a block that arrives in pieces: copy(dst, src) copies\n"
"each piece into place and feeds it to the checksum in the same pass (the GIL\n"
"released for pieces of 64 KiB or more); intdigest() is the checksum of every\n"
"piece so far, in order (equal to XXH3-64 of their concatenation). One thread\n"
"at a time: a call while another thread's copy is in flight raises\n"
"RuntimeError.");

typedef struct {
    PyObject_HEAD
    XXH3_state_t *state; /* 64-byte aligned, from XXH3_createState */
    int busy;            /* a copy is in flight with the GIL released */
} StreamingChecksum;

static PyObject *
streaming_checksum_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "StreamingChecksum() takes no arguments");
        return NULL;
    }
    StreamingChecksum *self = (StreamingChecksum *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->state = XXH3_createState();
    if (self->state == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    (void)XXH3_64bits_reset(self->state);
    self->busy = 0;
    return (PyObject *)self;
}

static void
streaming_checksum_dealloc(StreamingChecksum *self)
{
    if (self->state != NULL) {
        (void)XXH3_freeState(self->state);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
streaming_checksum_idle(StreamingChecksum *self, const char *fname)
{
    if (self->busy) {
        PyErr_Format(PyExc_RuntimeError,
                     "StreamingChecksum.%s(): another thread's copy is in flight", fname);
        return -1;
    }
    return 0;
}

static PyObject *
streaming_checksum_copy(StreamingChecksum *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    static const char *const fname = "StreamingChecksum.copy";
    static const char *const names[] = {"dst", "src"};
    PyObject *a[2];
    Py_buffer dst, src;

    if (parse_args(fname, args, nargs, kwnames, names, 2, a) < 0) {
        return NULL;
    }
    if (get_buffer(a[0], &dst, 1, fname, "dst", -1) < 0) {
        return NULL;
    }
    if (get_buffer(a[1], &src, 0, fname, "src", -1) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): dst has %zd bytes but src has %zd bytes (lengths must be equal)",
                     fname, dst.len, src.len);
        goto fail;
    }
    if (streaming_checksum_idle(self, "copy") < 0) {
        goto fail;
    }
    size_t n = (size_t)dst.len;
    char *d = (char *)dst.buf;
    const char *s = (const char *)src.buf;
    int streaming = use_streaming(n);
    /* A small piece is copied with the GIL held: handing the GIL over and
     * back would cost more than the copy. */
    self->busy = 1;
    PyThreadState *released = n >= KVF_GIL_FREE_MIN ? PyEval_SaveThread() : NULL;
    if ((uintptr_t)d < (uintptr_t)s + n && (uintptr_t)s < (uintptr_t)d + n) {
        /* Overlapping ranges: as the reference, copy with memmove semantics and
         * hash the source range as it is after the copy. */
        memmove(d, s, n);
        (void)KVF_XXH3_UPDATE(self->state, s, n);
    }
    else {
        copy_update(self->state, d, s, n, streaming);
        streaming_fence(streaming);
    }
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    self->busy = 0;
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;

fail:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return NULL;
}

static PyObject *
streaming_checksum_intdigest(StreamingChecksum *self, PyObject *Py_UNUSED(ignored))
{
    if (streaming_checksum_idle(self, "intdigest") < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)XXH3_64bits_digest(self->state));
}

static PyMethodDef streaming_checksum_methods[] = {
    {"copy", (PyCFunction)(void (*)(void))streaming_checksum_copy, METH_FASTCALL | METH_KEYWORDS,
     "copy($self, /, dst, src)\n--\n\nCopy src into dst (equal lengths) and feed the bytes "
     "to the checksum."},
    {"intdigest", (PyCFunction)(void (*)(void))streaming_checksum_intdigest, METH_NOARGS,
     "intdigest($self, /)\n--\n\nXXH3-64 of every byte copied so far."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StreamingChecksumType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvfabric._native.StreamingChecksum",
    .tp_basicsize = sizeof(StreamingChecksum),
    .tp_dealloc = (destructor)streaming_checksum_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = streaming_checksum_doc,
    .tp_methods = streaming_checksum_methods,
    .tp_new = streaming_checksum_new,
};

/* ------------------------------------------------------------------------- */
/* Module                                                                      */
/* ------------------------------------------------------------------------- */

static PyMethodDef native_methods[] = {
    {"copy_many_with_checksum", (PyCFunction)(void (*)(void))copy_many_with_checksum,
     METH_FASTCALL | METH_KEYWORDS, copy_many_with_checksum_doc},
    {"gather_with_checksum", (PyCFunction)(void (*)(void))gather_with_checksum,
     METH_FASTCALL | METH_KEYWORDS, gather_with_checksum_doc},
    {"scatter_with_checksum", (PyCFunction)(void (*)(void))scatter_with_checksum,
     METH_FASTCALL | METH_KEYWORDS, scatter_with_checksum_doc},
    {"encode_chunks_with_checksum", (PyCFunction)(void (*)(void))encode_chunks_with_checksum,
     METH_FASTCALL | METH_KEYWORDS, encode_chunks_with_checksum_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(native_doc,
"One-pass copy + XXH3-64 checksum paths for kvfabric block bytes.\n"
"\n"
"Reference semantics: the ``*_ref`` functions in kvfabric.integrity.");

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvfabric._native",
    .m_doc = native_doc,
    .m_size = -1,
    .m_methods = native_methods,
};

/* Which XXH3 long-input implementation this process uses. */
static const char *
xxh3_impl_name(void)
{
#if KVF_XXH_DISPATCH
    switch (XXH_featureTest()) {
        case XXH_AVX512: return "avx512 (runtime dispatch)";
        case XXH_AVX2: return "avx2 (runtime dispatch)";
        case XXH_SSE2: return "sse2 (runtime dispatch)";
        default: return "scalar (runtime dispatch)";
    }
#else
    switch (XXH_VECTOR) {
        case XXH_AVX512: return "avx512";
        case XXH_AVX2: return "avx2";
        case XXH_SSE2: return "sse2";
        case XXH_NEON: return "neon";
        default: return "scalar";
    }
#endif
}

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&StreamingChecksumType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&StreamingChecksumType);
    if (PyModule_AddObject(m, "StreamingChecksum", (PyObject *)&StreamingChecksumType) < 0) {
        Py_DECREF(&StreamingChecksumType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "XXHASH_VERSION", Py_STRINGIFY(XXH_VERSION_MAJOR) "."
                                   Py_STRINGIFY(XXH_VERSION_MINOR) "."
                                   Py_STRINGIFY(XXH_VERSION_RELEASE)) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK_SIZE", (long)KVF_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_CHUNK_SIZE", (long)KVF_NT_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_THRESHOLD",
                                KVF_HAVE_NT ? (long)KVF_NT_THRESHOLD : -1L) < 0 ||
        PyModule_AddStringConstant(m, "XXH3_IMPL", xxh3_impl_name()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
