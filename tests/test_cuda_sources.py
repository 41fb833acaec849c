"""The CUDA kernels' sources as the installed package ships them, and the CUDA-core launch plans (no GPU needed).

CI installs the package (not in editable mode), so these read the sources from the
installed files: a ``.cu`` or ``.cuh`` file missing from the package data fails here
rather than at a user's first kernel call on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re

import pytest

from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs

# Each source and the kernels the launchers call in it.
KERNELS = {
    "scan.cu": ["linear_scan", "delta_scan"],
    "chunk_mma.cu": ["chunk_linear_scan"],
    "chunk_wgmma.cu": ["chunk_linear_scan_wg"],
    "chunk_tf32.cu": ["chunk_linear_scan_tf32"],
    "delta_chunk.cu": ["delta_chunk_prepare", "delta_chunk_scan"],
    "delta_wgmma.cu": ["delta_chunk_scan_wg"],
    "gla_chunk.cu": ["gla_chunk_prepare", "gla_chunk_scan"],
    "segments.cu": ["segment_log_decay", "segment_prefix"],
    "delta_grad.cu": ["delta_grad_reverse", "delta_grad_forward"],
    "gate_grad.cu": ["gate_grad_rows", "gate_grad_suffix"],
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_sources_ship_with_their_headers_inlined(name: str) -> None:
    text = cl._source(name)
    assert not re.search(r'^#include "', text, flags=re.MULTILINE), "a local header was left to the compiler"
    for kernel in KERNELS[name]:
        assert re.search(rf'extern "C" __global__ void( __launch_bounds__\([^)]*\))?\s+{kernel}\(', text), kernel


def test_the_shared_header_is_inlined_where_it_is_used() -> None:
    for name in ("scan.cu", "delta_grad.cu"):
        assert "#define GEOMETRY_SETUP" in cl._source(name) and "#define LOAD_STATE" in cl._source(name)
    for name in ("chunk_mma.cu", "chunk_wgmma.cu", "delta_chunk.cu", "delta_wgmma.cu"):
        assert "__device__ __forceinline__ int chunk_decays(" in cl._source(name)
    for name in ("chunk_mma.cu", "chunk_wgmma.cu", "chunk_tf32.cu", "gla_chunk.cu"):
        assert "#define LINEAR_CHUNK_PARAMS" in cl._source(name) and "void copy16(" in cl._source(name)
    for name in ("delta_chunk.cu", "delta_wgmma.cu"):
        assert "#define DELTA_CHUNK_PARAMS" in cl._source(name) and "#define DELTA_CHUNK_GEOMETRY" in cl._source(name)
    for name in ("chunk_wgmma.cu", "delta_wgmma.cu"):
        assert "__device__ __forceinline__ u64 tile_descriptor(" in cl._source(name)
        assert cl._TARGETS[name] == ("-arch=sm_90a",)  # wgmma exists only for the architecture-specific target
    assert "__device__ __forceinline__ void share_state(" in cl._source("gla_chunk.cu")
    for name in ("scan.cu", "delta_grad.cu", "segments.cu", "gate_grad.cu"):
        assert "__device__ __forceinline__ ACC to_acc(__nv_bfloat16 x)" in cl._source(name)


@pytest.mark.parametrize(("dtype", "budget"), list(itertools.product(["float16", "float32", "float64"],
                                                                     [cs.HEAVY, cs.LIGHT, cs.Budget(64, 256)])))
def test_whole_warp_plans_are_whole_warps_and_cover_the_columns(dtype: str, budget: cs.Budget) -> None:
    """The gradient kernels shuffle across a warp's column groups: their blocks are whole warps."""
    for Dk, Dv in itertools.product((16, 32, 64, 100, 128, 256), repeat=2):
        plan = cs._plan(Dk, Dv, dtype, (3, 4), budget, whole_warps=True)
        if plan is None:  # a plan may not fit the tiles; then the launcher declines the call
            continue
        assert plan.threads % 32 == 0 and plan.threads <= 1024, (Dk, Dv, plan)
        assert plan.ksplit * plan.kpt >= Dk and plan.vb % plan.nc == 0, (Dk, Dv, plan)


def test_linear_tensor_core_plans_fit_and_share_q_and_k_where_they_can() -> None:
    """The linear kernel's plan fits an H100's shared memory, two groups wherever Dv has their columns.

    Where two groups with two q tiles in flight do not fit (Dk = 256), they share one.
    """
    from linattn.backends import _cuda_chunk as cc

    limit = 227 * 1024
    for dtype, Dk, Dv in itertools.product(["float16", "bfloat16"], range(8, 257, 8), range(8, 257, 8)):
        plan = cc._chunk_plan(dtype, Dk, Dv, limit)
        if plan is None:  # an odd number of 16-key tiles that four warps cannot split
            assert cc.warps_along_rows(16 * -(-Dk // 16), min(64 if Dk <= 128 else 32, 16 * -(-Dv // 16))) is None
            continue
        assert plan.shared_bytes <= limit and plan.dkp >= Dk, (Dk, Dv, plan)
        assert plan.groups == (2 if Dv > plan.vb else 1), (Dk, Dv, plan)  # both groups whenever Dv has the columns
        two_q_tiles = dataclasses.replace(plan, q_tiles=2)
        assert plan.q_tiles == (2 if two_q_tiles.shared_bytes <= limit else 1), (Dk, Dv, plan)
    assert cc._chunk_plan("bfloat16", 256, 256, limit).q_tiles == 1  # FLA's D = 256 benchmark shape


def test_warpgroup_plans_fit_and_cover_what_they_should(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wgmma kernel's plan on an H100: 16-bit data with Dk <= 256, fitting, its warpgroups as the kernel needs.

    Dk <= 128: keys padded to 64, two warpgroups of 64 value columns when Dv > 64. Dk > 128:
    keys padded to 256, split by two warpgroups over one tile of 64 value columns, which
    narrowing to one warpgroup must leave alone. Everything else (float32, another GPU
    generation) is left to the mma.sync plan.
    """
    from linattn.backends import _cuda_chunk as cc

    limit = 227 * 1024
    monkeypatch.setattr(cc, "_shared_limit", lambda device: limit)
    monkeypatch.setattr(cl, "compute_capability", lambda device: "90")
    monkeypatch.setattr(cs, "_sm_count", lambda device: 132)
    for dtype, Dk, Dv, gated in itertools.product(["float16", "bfloat16"], range(8, 257, 8), range(8, 257, 8),
                                                  [False, True]):
        plan = cc._warpgroup_plan(dtype, Dk, Dv, gated, 0)
        assert plan is not None and plan.shared_bytes <= limit, (Dk, Dv, gated, plan)
        assert plan.gated == gated and cc.linear_plan(dtype, Dk, Dv, gated, 0) == plan
        if Dk > 128:
            assert (plan.dkp, plan.groups, plan.columns, plan.key_split) == (256, 2, 64, True), (Dk, Dv, plan)
            assert cc._one_warpgroup_where_it_fills(plan, 1, Dv, 1000, 0) == plan
        else:
            assert plan.dkp == 64 * -(-Dk // 64) and plan.groups == (2 if Dv > 64 else 1) and not plan.key_split
            assert plan.columns == 64 * plan.groups
    assert cc._warpgroup_plan("float32", 64, 64, False, 0) is None
    monkeypatch.setattr(cl, "compute_capability", lambda device: "80")  # sm_90a code runs on 9.0 alone
    assert cc._warpgroup_plan("bfloat16", 64, 64, False, 0) is None
    assert isinstance(cc.linear_plan("bfloat16", 64, 64, False, 0), cc._LinearPlan)


def test_float32_tensor_core_plans_fit_two_blocks_and_cover_what_they_should(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 3xTF32 kernel's plans: ungated float32 with Dk <= 128 and Dk, Dv multiples of 4, widest first.

    Every plan leaves room for two blocks per H100 multiprocessor (228 KiB, 1 KiB of it
    reserved per block), which is what its occupancy was measured with; anything else is
    left to the CUDA-core kernel (None), as is everything with ``TF32X3`` off.
    """
    from linattn.backends import _cuda_chunk as cc

    monkeypatch.setattr(cc, "_shared_limit", lambda device: 227 * 1024)
    for Dk, Dv, gated in itertools.product(range(4, 261, 4), range(4, 261, 4), [False, True]):
        plans = cc._tf32_plans("float32", Dk, Dv, gated, 0)
        if gated or Dk > 128:
            assert plans == () and cc.linear_plan("float32", Dk, Dv, gated, 0) is None
            continue
        assert plans and cc.linear_plan("float32", Dk, Dv, gated, 0) == plans[0], (Dk, Dv)
        assert [p.warps for p in plans] == [w for w in (4, 2, 1) if 16 * w < Dv + 16 or w == 1], (Dk, Dv)
        for plan in plans:
            assert plan.dkp == 8 * -(-Dk // 8) and 2 * (plan.shared_bytes + 1024) <= 228 * 1024, (Dk, Dv, plan)
    for dtype, Dk, Dv in [("float32", 6, 8), ("float32", 8, 6), ("float64", 64, 64), ("bfloat16", 4, 4)]:
        assert cc._tf32_plans(dtype, Dk, Dv, False, 0) == ()
    monkeypatch.setattr(cc, "TF32X3", False)
    assert cc.linear_plan("float32", 64, 64, False, 0) is None


@pytest.mark.parametrize("module", ["_cuda_delta_chunk", "_cuda_gla_chunk"])
def test_tensor_core_plans_fit_and_cover_the_columns(module: str) -> None:
    """Every plan of the delta rule's and GLA's tensor-core launchers fits an H100's shared memory and whole warps."""
    launcher = importlib.import_module(f"linattn.backends.{module}")
    limit = 227 * 1024
    for dtype, Dk, Dv in itertools.product(["float16", "bfloat16", "float32"], range(8, 257, 8), range(8, 257, 8)):
        plans = launcher._scan_plans(dtype, Dk, Dv, limit)
        if dtype == "float32" or Dk > 128:
            assert plans == ()
        elif Dv >= 64:  # below, an odd number of 16-key tiles may not split over four warps
            assert plans, (dtype, Dk, Dv)
        for plan in plans:
            wn = 4 // plan.wm
            assert plan.shared_bytes <= limit and launcher._prepare_shared_bytes(plan.dkp) <= limit
            assert plan.dkp >= Dk and plan.dkp % (16 * plan.wm) == 0, (Dk, Dv, plan)
            assert (plan.vb // 8) % wn == 0 and (plan.vb // 8 // wn) % 2 == 0, (Dk, Dv, plan)
        assert [p.columns for p in plans] == sorted((p.columns for p in plans), reverse=True)


def test_gla_key_parts_cover_the_keys_in_launches_the_kernels_hold() -> None:
    """Up to 128 keys one part; to 256 two parts whose padded keys each fit the kernels (and have plans), the second
    starting on a multiple of 8 keys (rows on 16 bytes), splitting the keys as evenly as that allows; past 256 none."""
    from linattn.backends import _cuda_gla_chunk as gc

    for Dk in range(1, 129):
        assert gc.key_parts(Dk) == ((0, Dk),)
    for Dk in range(129, 257):
        (first, a), (second, b) = gc.key_parts(Dk)
        assert first == 0 and second == a and a + b == Dk and a % 8 == 0 and 0 <= a - b < 16, Dk
        assert 16 * -(-a // 16) <= 128, Dk
        if Dk % 8 == 0:
            assert all(gc._scan_plans("bfloat16", keys, 64, 227 * 1024) for keys in (a, b)), Dk
    assert gc.key_parts(257) == () and gc.key_parts(512) == ()


def test_gla_plans_form_the_decays_over_whole_steps() -> None:
    """The scan's threads per pair of keys divide the chunk's 64 steps and fit the block with every pair."""
    from linattn.backends import _cuda_gla_chunk as gc

    for Dk, Dv in itertools.product(range(8, 129, 8), (8, 64, 128, 256)):
        for plan in gc._scan_plans("bfloat16", Dk, Dv, 227 * 1024):
            pairs = plan.dkp // 2
            assert 64 % plan.segments == 0 and plan.segments * pairs <= plan.threads, (Dk, Dv, plan)
            assert plan.segments == 64 or 2 * plan.segments * pairs > plan.threads, (Dk, Dv, plan)  # the most


def test_gla_scan_forms_each_chunks_decays_once_per_leading_index_at_dk_128() -> None:
    """Dk = Dv = 128: one block of two groups takes all 128 value columns (each tile held once fits), so the
    chunk's decayed queries and keys are formed once per leading index where the blocks fill the GPU."""
    from linattn.backends import _cuda_gla_chunk as gc

    plans = gc._scan_plans("bfloat16", 128, 128, 227 * 1024)
    assert [(p.vb, p.groups) for p in plans][:2] == [(64, 2), (32, 2)]
    second_v_and_p = 2 * gc._CHUNK * (128 + 8) + 2 * 2 * gc._CHUNK * (gc._CHUNK + 8)  # bytes: v, P's two parts
    assert plans[0].shared_bytes <= 227 * 1024 < plans[0].shared_bytes + second_v_and_p
    # (plan columns, time segments) at (16, 2048, 16, 128), (4, 4096, 64, 128) and (1, 8192, 96, 128): one wave of
    # 128-column blocks (96 blocks at the last: T = 8192 has too few steps for two segments of each of them).
    for n_lead, T in ((256, 2048), (256, 4096), (96, 8192)):
        plan, segments, _ = gc.choose_tiling(plans, n_lead, 128, T, 132)
        assert (plan.columns, segments) == (128, 1), (n_lead, T)


def test_gla_scan_splits_time_where_the_leading_indices_are_few() -> None:
    """(2, 16384, 16, 128): 32 leading indices. Four time segments of 128-column blocks fill an H100 (128 blocks),
    where one pass would need blocks of 32 columns, each forming its chunks' decays again; shorter sequences keep
    one pass. The first pass (no outputs: neither q, P nor the shared state) needs under half the shared memory."""
    from linattn.backends import _cuda_gla_chunk as gc

    plans = gc._scan_plans("bfloat16", 128, 128, 227 * 1024)
    plan, segments, seg_len = gc.choose_tiling(plans, 32, 128, 16384, 132)
    assert (plan.columns, segments, seg_len) == (128, 4, 4096)
    plan, segments, seg_len = gc.choose_tiling(plans, 1, 128, 5001, 132)  # nothing fills: the narrowest, 2 segments
    assert (plan.columns, segments, seg_len) == (plans[-1].columns, 2, 2560)
    plan, segments, _ = gc.choose_tiling(plans, 64, 128, 2048, 132)  # (4, 2048, 16, 128): too short to split
    assert (plan.columns, segments) == (64, 1)
    assert 2 * plans[0].first_pass_shared_bytes < plans[0].shared_bytes


def test_delta_tensor_core_tiles_narrow_when_the_leading_indices_are_few() -> None:
    """Wide tiles while they fill the multiprocessors, narrower ones (more blocks) when they would not."""
    from linattn.backends import _cuda_delta_chunk as dc

    plans = dc._scan_plans("bfloat16", 128, 128, 227 * 1024)
    assert [(p.vb, p.groups) for p in plans] == [(64, 2), (64, 1), (32, 1), (16, 1)]
    assert dc._choose(plans, 256, 128, 132).columns == 128  # (16, 2048, 16, 128): 256 blocks
    assert dc._choose(plans, 96, 128, 132).columns == 128  # (1, 8192, 96, 128): 96 blocks, one wave
    assert dc._choose(plans, 64, 128, 132).columns == 64  # (4, 2048, 16, 128): 128 blocks
    assert dc._choose(plans, 32, 128, 132).columns == 32  # (2, 16384, 16, 128): 128 blocks
    assert dc._choose(plans, 1, 128, 132).columns == 16  # the narrowest when nothing fills the GPU


def test_delta_warpgroup_plans_fit_and_fill_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tiling of the delta rule's warpgroup scan fits an H100's shared memory; two warpgroups per block
    while those blocks fill 70% of its 132 multiprocessors, else one (even where mma.sync's narrower tiles
    would give more blocks: one warpgroup of 64 columns was faster at the shapes measured)."""
    from linattn.backends import _cuda_delta_chunk as dc

    limit = 227 * 1024
    for Dk, Dv, gated in itertools.product(range(8, 257, 8), range(8, 257, 8), (False, True)):
        plans = dc._warpgroup_plans(Dk, Dv, gated, limit)
        assert all(p.shared_bytes <= limit and dc._prepare_shared_bytes(16 * -(-Dk // 16)) <= limit for p in plans)
        if Dk > 128:  # the two warpgroups split the keys (padded to 256) of 64 value columns
            assert [(p.dkp, p.groups, p.key_split, p.columns) for p in plans] == [(256, 2, True, 64)], (Dk, Dv)
        else:
            assert [p.groups for p in plans] == ([2, 1] if Dv > 64 else [1]), (Dk, Dv)
            assert all(p.dkp == 64 * -(-Dk // 64) and not p.key_split for p in plans), (Dk, Dv)
    assert dc._warpgroup_plans(264, 128, True, limit) == () and dc._warpgroup_plans(128, 12, True, limit) == ()
    plans = dc._warpgroup_plans(128, 128, True, limit)
    # (n_lead, columns per block): (16, 2048, 16, 128), (1, 8192, 96, 128), (4, 2048, 16, 128), (2, 16384, 16, 128)
    for n_lead, columns in ((256, 128), (96, 128), (64, 64), (32, 64), (1, 64)):
        assert dc.choose_warpgroup(plans, n_lead, 128, 132).columns == columns, n_lead
    assert dc.choose_warpgroup((), 96, 128, 132) is None
    monkeypatch.setattr(dc, "_shared_limit", lambda device: limit)
    monkeypatch.setattr(cs, "_sm_count", lambda device: 132)
    monkeypatch.setattr(cl, "compute_capability", lambda device: "90")
    assert dc.warpgroup_plan(128, 128, True, 96, 0) == plans[0]
    monkeypatch.setattr(dc, "WGMMA", False)
    assert dc.warpgroup_plan(128, 128, True, 96, 0) is None
    monkeypatch.setattr(dc, "WGMMA", True)
    monkeypatch.setattr(cl, "compute_capability", lambda device: "80")  # sm_90a code runs on 9.0 alone
    assert dc.warpgroup_plan(128, 128, True, 96, 0) is None


def test_segment_state_strides_address_an_array_of_states_per_segment() -> None:
    """The strides the time-segmented scans read their entering states by are a (lead ×3, P, Dk, Dv) array's."""
    import numpy as np

    for lead3, P, Dk, Dv in [((1, 1, 1), 4, 64, 64), ((2, 3, 5), 2, 256, 64), ((1, 16, 1), 3, 96, 192)]:
        states = np.empty((*lead3, P, Dk, Dv), np.float32)
        assert cs.segment_state_strides(lead3, P, Dk, Dv) == [s // 4 for s in states.strides]
