"""The kernels of the "validate your kernel" tutorial (docs/validate.rst), and the reports it shows.

Run from the repository root:  python docs/scripts/validate_tutorial.py

It writes docs/_static/validate_buggy.txt and docs/_static/validate_fixed.txt: the
reports of ``linattn.testing.validate`` on the chunked GLA kernel below, with its bug
and fixed. tests/test_docs_examples.py checks that they are what validate says today.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from linattn.testing import validate

# --- kernel: start ---
CHUNK = 64


def chunked_gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False):
    """Gated linear attention in chunks of 64 steps: S_t = exp(gk_t) S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

    Within a chunk the outputs come from one masked matrix product; the state carries
    the chunks before it. (B, T, H, D) arrays, as flash-linear-attention's chunk_gla.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    work = np.float32
    q, k, v, gk = (np.asarray(x, dtype=work) for x in (q, k, v, gk))
    S = np.zeros((B, H, K, V), work) if initial_state is None else np.array(initial_state, dtype=work)
    o = np.zeros((B, T, H, V), work)
    for start in range(0, T - CHUNK + 1, CHUNK):  # BUG: the last T % 64 steps are never visited
        end = start + CHUNK
        G = np.cumsum(gk[:, start:end], axis=1)  # (B, C, H, K): log-decay from the chunk's start
        q_in = q[:, start:end] * np.exp(G)  # q_t ⊙ e^{G_t}
        k_in = k[:, start:end] * np.exp(-G)  # k_s ⊙ e^{-G_s} (fine for moderate gates)
        scores = np.einsum("bthk,bshk->bhts", q_in, k_in) * np.tril(np.ones((CHUNK, CHUNK), work))
        o[:, start:end] = scale * (np.einsum("bhts,bshv->bthv", scores, v[:, start:end])
                                   + np.einsum("bthk,bhkv->bthv", q_in, S))
        decay = np.exp(G[:, -1])  # (B, H, K): the whole chunk's decay
        S = decay[..., None] * S + np.einsum("bshk,bshv->bhkv", k_in * decay[:, None], v[:, start:end])
    o = o.astype(np.asarray(q).dtype)
    return (o, S) if output_final_state else o
# --- kernel: end ---


# --- fixed: start ---
def chunked_gla_fixed(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False):
    """The same kernel, with the last, partial chunk included."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    work = np.float32
    q, k, v, gk = (np.asarray(x, dtype=work) for x in (q, k, v, gk))
    S = np.zeros((B, H, K, V), work) if initial_state is None else np.array(initial_state, dtype=work)
    o = np.zeros((B, T, H, V), work)
    for start in range(0, T, CHUNK):  # every chunk, the last one possibly shorter
        end = min(start + CHUNK, T)
        G = np.cumsum(gk[:, start:end], axis=1)
        q_in = q[:, start:end] * np.exp(G)
        k_in = k[:, start:end] * np.exp(-G)
        scores = np.einsum("bthk,bshk->bhts", q_in, k_in) * np.tril(np.ones((end - start, end - start), work))
        o[:, start:end] = scale * (np.einsum("bhts,bshv->bthv", scores, v[:, start:end])
                                   + np.einsum("bthk,bhkv->bthv", q_in, S))
        decay = np.exp(G[:, -1])
        S = decay[..., None] * S + np.einsum("bshk,bshv->bhkv", k_in * decay[:, None], v[:, start:end])
    o = o.astype(np.asarray(q).dtype)
    return (o, S) if output_final_state else o
# --- fixed: end ---


# As if imported from the user's own module, which is what the report names.
chunked_gla.__module__ = chunked_gla_fixed.__module__ = "my_kernels"

# The cases the tutorial runs: the kernel takes no cu_seqlens and one head count, so
# varlen and gqa would only be skipped; "extreme" gates overflow its e^{-G} by design.
CASES = ["basic", "t1", "t23", "tail", "odd_dims", "scale", "default_scale", "initial_state", "state_passing",
         "causality", "long"]


def reports():
    """The reports of the buggy and the fixed kernel."""
    return (validate(chunked_gla, "gla", cases=CASES, grads=False),
            validate(chunked_gla_fixed, "gla", cases=CASES, grads=False))


STATIC = Path(__file__).resolve().parents[1] / "_static"


def main(out: Path = STATIC) -> None:
    buggy, fixed = reports()
    (out / "validate_buggy.txt").write_text(str(buggy) + "\n", encoding="utf-8")
    (out / "validate_fixed.txt").write_text(str(fixed) + "\n", encoding="utf-8")
    print(buggy)
    print(fixed.summary())


if __name__ == "__main__":
    sys.exit(main())
