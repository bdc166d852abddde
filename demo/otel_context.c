/* otel_context: publishes the demo application's OpenTelemetry context where an
 * out-of-process reader such as synspan finds it.
 *
 * - Thread context (OTEP 4947): the exported TLS variable `otel_thread_ctx_v1`, a pointer to
 *   the calling thread's active record or NULL. Python loads this module with dlopen, so it is
 *   built with -mtls-dialect=gnu2 (TLSDESC), the dialect the specification recommends.
 * - Process context (OTEP 4719): a memfd named OTEL_CTX, mapped, holding the header and the
 *   ProcessContext protobuf the application encoded.
 *
 * The reader interrupts the thread in the kernel (a syscall, a tracepoint in its context); it
 * never runs beside it. A record is therefore rewritten with the pointer NULL, and the
 * compiler may not move the writes across the pointer's (signal-handler semantics). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

/* The fixed part (trace id, span id, valid, flags, attrs_size) and the attribute bytes, at
 * most 640 bytes in all, as the specification recommends. */
#define RECORD_FIXED 28
#define RECORD_MAX 640

__attribute__((visibility("default"))) __thread void *otel_thread_ctx_v1;

/* Each thread's own record: a thread only ever publishes its own. 2-byte alignment at least. */
static __thread unsigned char record[RECORD_MAX] __attribute__((aligned(8)));

static void publish(void *value) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    *(void *volatile *)&otel_thread_ctx_v1 = value;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static PyObject *set_thread_context(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer trace_id, span_id, attrs;
    unsigned char flags;
    if (!PyArg_ParseTuple(args, "y*y*by*", &trace_id, &span_id, &flags, &attrs))
        return NULL;
    PyObject *result = NULL;
    if (trace_id.len != 16 || span_id.len != 8) {
        PyErr_SetString(PyExc_ValueError, "trace id is 16 bytes, span id 8");
    } else if (attrs.len > RECORD_MAX - RECORD_FIXED) {
        PyErr_SetString(PyExc_ValueError, "attributes longer than a record holds");
    } else {
        publish(NULL);
        uint16_t size = (uint16_t)attrs.len;
        memcpy(record, trace_id.buf, 16);
        memcpy(record + 16, span_id.buf, 8);
        record[24] = 1;
        record[25] = flags;
        memcpy(record + 26, &size, sizeof size);
        memcpy(record + RECORD_FIXED, attrs.buf, attrs.len);
        publish(record);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&trace_id);
    PyBuffer_Release(&span_id);
    PyBuffer_Release(&attrs);
    return result;
}

static PyObject *clear_thread_context(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    publish(NULL);
    Py_RETURN_NONE;
}

#define HEADER 32
static unsigned char *process_context;
static size_t process_context_len;

static uint64_t boottime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Publishes (once) or republishes the process context: `payload` is an encoded
 * ProcessContext. published_at_ns is 0 while the mapping is rewritten, so a reader that
 * catches it in between retries. */
static PyObject *publish_process_context(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer payload;
    if (!PyArg_ParseTuple(args, "y*", &payload))
        return NULL;
    size_t need = HEADER + (size_t)payload.len;
    if (process_context && need > process_context_len) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError, "payload larger than the first one's mapping");
        return NULL;
    }
    if (!process_context) {
        size_t len = (need + 4095) & ~(size_t)4095;
        int fd = memfd_create("OTEL_CTX", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
            if (fd >= 0)
                close(fd);
            PyBuffer_Release(&payload);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        void *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (base == MAP_FAILED) {
            PyBuffer_Release(&payload);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        madvise(base, len, MADV_DONTFORK);
        /* Where the kernel names anonymous mappings; elsewhere the memfd's name shows. */
        (void)prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)base, len,
                    (unsigned long)"OTEL_CTX");
        process_context = base;
        process_context_len = len;
    }
    uint64_t zero = 0, at = boottime_ns(), payload_ptr = (uint64_t)(uintptr_t)(process_context + HEADER);
    uint32_t version = 2, size = (uint32_t)payload.len;
    memcpy(process_context + 16, &zero, 8);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(process_context, "OTEL_CTX", 8);
    memcpy(process_context + 8, &version, 4);
    memcpy(process_context + 12, &size, 4);
    memcpy(process_context + 24, &payload_ptr, 8);
    memcpy(process_context + HEADER, payload.buf, payload.len);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(process_context + 16, &at, 8);
    PyBuffer_Release(&payload);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_thread_context", set_thread_context, METH_VARARGS,
     "set_thread_context(trace_id, span_id, trace_flags, attrs): publish this thread's active span"},
    {"clear_thread_context", clear_thread_context, METH_NOARGS,
     "clear_thread_context(): no span is active on this thread"},
    {"publish_process_context", publish_process_context, METH_VARARGS,
     "publish_process_context(payload): publish an encoded ProcessContext in the OTEL_CTX mapping"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "otel_context", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_otel_context(void) { return PyModule_Create(&module); }
