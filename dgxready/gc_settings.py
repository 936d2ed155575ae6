"""The garbage collector's settings for a long-running server process (the multiplexer, and the
bare proxy its overhead is measured against)."""
from __future__ import annotations

import gc

# Python's first-generation threshold, 700, sets off a collection at each burst of allocations a
# request makes (its JSON, its headers), most of them dead again a moment later: 215 collections in
# 3 s at 16 streams, about 8 µs a request, on the 2-core VM. At 20000 the same load ran none.
GC_THRESHOLDS = (20_000, 20, 20)


def settle_gc() -> None:
    """For a long-running server, once started: the start-up objects, which never die, out of the
    collector's reach (scanning them lengthened the pauses in tail latency), and a first-generation
    threshold above a request's burst of allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
