"""Thread pools of the native libraries under the vector math, sized for a server."""
from __future__ import annotations

import threadpoolctl


def one_blas_thread() -> None:
    """Run BLAS (numpy's matrix-vector products: exact vector search) on the calling thread.

    OpenBLAS's worker threads keep spinning for about 2**28 cycles (~0.1 s) after each call
    before they sleep, so each exact search left a core busy while the next query's embedding
    (onnxruntime, on every core) ran: a search over 2,000 embedded rows took 11-16 ms in
    process, 5.5-6.2 ms with one BLAS thread. A search is one product of at most a few
    hundred thousand rows, which one thread does in milliseconds; embedding keeps
    onnxruntime's own threads. Applies to the BLAS libraries loaded when it is called."""
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")
