"""linattn: a framework-agnostic reference for exact and efficient attention.

Every method is defined once against the Python array API and runs on NumPy (and on
any array-API library); :mod:`linattn.testing` compares other implementations with it.
"""

from linattn import bounds, decoding, feature_maps
from linattn.cosformer import cosformer_attention, cosformer_attention_vjp
from linattn.delta import delta_rule, delta_rule_vjp, gated_delta_rule, gated_delta_rule_vjp
from linattn.flash import flash_attention, flash_attention_backward
from linattn.gated import gla, gla_vjp, retention, retention_vjp, simple_gla, simple_gla_vjp
from linattn.hgrn import hgrn, hgrn_vjp
from linattn.hybrid import hybrid_attention
from linattn.linear import linear_attention, linear_attention_vjp
from linattn.linformer import linformer_attention, linformer_attention_vjp, linformer_projections
from linattn.mamba import selective_scan, selective_scan_vjp
from linattn.mamba2 import mamba2, mamba2_vjp
from linattn.performer import performer_attention, performer_attention_vjp
from linattn.rwkv import rwkv6, rwkv6_vjp
from linattn.scan import causal_scan, causal_scan_vjp, noncausal_scan
from linattn.softmax import alibi_slopes, softmax_attention, softmax_attention_vjp
from linattn.sparse import (
    bigbird_attention,
    bigbird_attention_vjp,
    bigbird_layout,
    block_sparse_attention,
    block_sparse_attention_vjp,
    layout_to_mask,
    longformer_attention,
    longformer_attention_vjp,
    longformer_layout,
)

__version__ = "0.1.0"

__all__ = [
    "alibi_slopes",
    "bigbird_attention",
    "bigbird_attention_vjp",
    "bigbird_layout",
    "block_sparse_attention",
    "block_sparse_attention_vjp",
    "bounds",
    "causal_scan",
    "causal_scan_vjp",
    "cosformer_attention",
    "cosformer_attention_vjp",
    "decoding",
    "delta_rule",
    "delta_rule_vjp",
    "feature_maps",
    "flash_attention",
    "flash_attention_backward",
    "gated_delta_rule",
    "gated_delta_rule_vjp",
    "gla",
    "gla_vjp",
    "hgrn",
    "hgrn_vjp",
    "hybrid_attention",
    "layout_to_mask",
    "linear_attention",
    "linear_attention_vjp",
    "linformer_attention",
    "linformer_attention_vjp",
    "linformer_projections",
    "longformer_attention",
    "longformer_attention_vjp",
    "longformer_layout",
    "mamba2",
    "mamba2_vjp",
    "noncausal_scan",
    "performer_attention",
    "performer_attention_vjp",
    "retention",
    "retention_vjp",
    "rwkv6",
    "rwkv6_vjp",
    "selective_scan",
    "selective_scan_vjp",
    "simple_gla",
    "simple_gla_vjp",
    "softmax_attention",
    "softmax_attention_vjp",
]
