"""Hardware adapters: each turns one kind of device into pseudonymised Readings."""

import os

# numpy only carries camera frames here; it never multiplies a matrix.  OpenBLAS would
# start a thread pool per BLAS library at import (one thread per core, each with its
# buffers) that would sit idle for the life of the daemon.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
