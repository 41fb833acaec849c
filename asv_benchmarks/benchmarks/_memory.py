"""Peak memory of one call, as the benchmarks' ``track_peak_traced_bytes`` report it."""

import tracemalloc


def traced_peak_bytes(call):
    """Peak bytes traced by tracemalloc during ``call()``, beyond what existed before it.

    NumPy reports its array buffers to tracemalloc, so this is the largest amount of
    memory the call held at once: its output and every temporary. Call the function once
    untraced before, so that one-time allocations (caches, lazy imports) are not counted.
    """
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak - base
