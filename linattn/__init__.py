"""linattn: a framework-agnostic reference for exact and efficient attention.

Every method is defined once against the Python array API and runs on NumPy (and on
any array-API library); :mod:`linattn.testing` compares other implementations with it.
"""

from linattn.flash import flash_attention, flash_attention_backward
from linattn.softmax import alibi_slopes, softmax_attention, softmax_attention_vjp

__version__ = "0.1.0"

__all__ = [
    "alibi_slopes",
    "flash_attention",
    "flash_attention_backward",
    "softmax_attention",
    "softmax_attention_vjp",
]
