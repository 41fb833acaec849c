"""The CUDA scan kernels (CuPy backend): time of the linear, scalar-gated and delta-rule scans.

Runs only where CuPy sees a CUDA device; elsewhere (CI) ``setup`` raises
NotImplementedError, which asv records as skipped. Shapes (B, H, T, D) = (4, 16, T, 128),
float32; the peers are compared by ``docs/scripts/gpu_peers.py``.
"""

import numpy as np

from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan


def _cupy():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no CuPy, or no driver / device
        pass
    raise NotImplementedError("needs CuPy and a CUDA device")


class TimeCudaScans:
    params = (["linear", "simple_gla", "delta"], [1024, 4096])
    param_names = ("scan", "T")

    def setup(self, scan, T):
        cp = _cupy()
        rng = np.random.default_rng(0)
        q, k, v = (cp.asarray(rng.standard_normal((4, 16, T, 128), dtype=np.float32)) for _ in range(3))
        k = k / cp.linalg.norm(k, axis=-1, keepdims=True)
        g = cp.asarray(-rng.random((4, 16, T, 1), dtype=np.float32))
        beta = cp.asarray(rng.random((4, 16, T, 1), dtype=np.float32))
        calls = {
            "linear": lambda: causal_scan(q, k, v, backend="cupy"),
            "simple_gla": lambda: causal_scan(q, k, v, gk=g, backend="cupy"),
            "delta": lambda: delta_scan(q, k, v, beta, backend="cupy"),
        }
        self.call, self.sync = calls[scan], cp.cuda.Device().synchronize
        self.call()  # compile outside the timing
        self.sync()

    def time_forward(self, scan, T):
        self.call()
        self.sync()
