"""Error bounds of the approximate methods, against exact softmax attention.

- Performer (FAVOR+): the mean and variance of the random-feature estimate of the softmax
  kernel, for positive and trigonometric features (:func:`favor_positive_moments`,
  :func:`favor_trig_moments`).
- Linformer: the projection size its Johnson–Lindenstrauss argument needs and the failure
  probability it promises (:func:`linformer_projection_dim`, :func:`linformer_failure_bound`,
  :func:`jl_inner_product_failure_bound`, :func:`linformer_sketch_variance`).
"""

from linattn.bounds.linformer import (
    jl_inner_product_failure_bound,
    linformer_failure_bound,
    linformer_projection_dim,
    linformer_sketch_variance,
)
from linattn.bounds.performer import favor_positive_moments, favor_trig_moments

__all__ = [
    "favor_positive_moments",
    "favor_trig_moments",
    "jl_inner_product_failure_bound",
    "linformer_failure_bound",
    "linformer_projection_dim",
    "linformer_sketch_variance",
]
