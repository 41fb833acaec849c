"""The CUDA scan kernels (CuPy backend): time of the linear, scalar-gated and delta-rule scans and their gradients.

Runs only where CuPy sees a CUDA device; elsewhere (CI) ``setup`` raises
NotImplementedError, which asv records as skipped. Shapes (B, H, T, D) = (4, 16, T, 128),
float32; the peers are compared by ``docs/scripts/gpu_peers.py``.
"""

import numpy as np

from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import delta_scan
from linattn.scan import causal_scan, causal_scan_vjp


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
        do = cp.asarray(rng.standard_normal((4, 16, T, 128), dtype=np.float32))
        gradients = {
            "linear": lambda: causal_scan_vjp(q, k, v, do, backend="cupy"),
            "simple_gla": lambda: causal_scan_vjp(q, k, v, do, gk=g, backend="cupy"),
            "delta": lambda: delta_scan_vjp(q, k, v, beta, do, backend="cupy"),
        }
        self.call, self.gradients, self.sync = calls[scan], gradients[scan], cp.cuda.Device().synchronize
        self.call()  # compile outside the timing
        self.gradients()
        self.sync()

    def time_forward(self, scan, T):
        self.call()
        self.sync()

    def time_gradients(self, scan, T):
        self.gradients()
        self.sync()
