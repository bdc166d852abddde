/* An OpenTelemetry thread-context publisher (OTEP 4947) for the test bed: the TLS variable
 * `otel_thread_ctx_v1`, exported, pointing at the active record or NULL.
 *
 * Built three ways (build.rs): into synspan-traced itself, where the linker relaxes the
 * access to local-exec (static TLS in the main executable); and as two shared libraries that
 * synspan-traced-dl loads with dlopen, one with TLSDESC (-mtls-dialect=gnu2), one with the
 * legacy general-dynamic sequence (-mtls-dialect=gnu). */

__attribute__((visibility("default"))) __thread void *otel_thread_ctx_v1;

/* The record is complete before the pointer names it, and the compiler may not reorder the
 * two: a reader interrupts this thread, it never runs beside it (signal-handler semantics). */
__attribute__((visibility("default"))) void synspan_testbed_publish(void *record) {
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    *(void *volatile *)&otel_thread_ctx_v1 = record;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* Where this thread's variable is, for the tests to check the reader's arithmetic. */
__attribute__((visibility("default"))) void *synspan_testbed_variable(void) {
    return &otel_thread_ctx_v1;
}
