"""Attention kernels, LSE merge and distributed joint attention (Ulysses, Ring, USP) against single-process SDPA.

Multi-process cases run on CPU with gloo through `run_distributed`: every case of one world size runs in one spawn
(the module-scoped `spawned` fixture, see tests/_spawn.py), and each case reports as its own test,
`test_joint_attention[world4-u2r2-img13-trailing3]`.
"""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffusers_qwen_sp.attention import attention_with_lse, joint_attention, merge_attention_blocks
from diffusers_qwen_sp.distributed import (
    ParallelGroups,
    broadcast_from_rank0,
    count_communication,
    init_distributed,
    sp_shard_bounds,
    take_shard,
)
from diffusers_qwen_sp.distributed import DistributedProcessError, run_distributed

from _spawn import Spawn, spawn_fixture, world_cases


TOL = 1e-5
BATCH, TXT_LEN, HEADS, HEAD_DIM = 2, 6, 4, 8
CALLS_PER_CASE = 3
IMAGE_LENGTHS = (13, 37, 5, 8, 1)
TEXT_MASKS = ("none", "trailing3", "noncontiguous", "sample0_all_masked")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the parent and the spawned ranks
# ---------------------------------------------------------------------------------------------------------------------


def _text_mask(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(BATCH, TXT_LEN, dtype=torch.bool)
    if kind == "trailing3":
        mask[1, -3:] = False  # sample 0 unpadded, sample 1 with 3 trailing padding tokens
    elif kind == "noncontiguous":
        mask[0] = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
        mask[1] = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
    elif kind == "sample0_all_masked":
        mask[0] = False  # sample 0 attends to image keys only
        mask[1, -2:] = False
    else:
        raise ValueError(kind)
    return mask


def _make_inputs(seed: int, image_len: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(seq: int) -> torch.Tensor:
        return torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=generator).to(dtype)

    return {
        "txt_q": randn(TXT_LEN),
        "txt_k": randn(TXT_LEN),
        "txt_v": randn(TXT_LEN),
        "img_q": randn(image_len),
        "img_k": randn(image_len),
        "img_v": randn(image_len),
    }


def _reference(inputs: dict[str, torch.Tensor], txt_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock processor: SDPA over [text, image] with the [txt_mask, ones] mask, on full unpadded tensors."""
    query = torch.cat([inputs["txt_q"], inputs["img_q"]], dim=1).transpose(1, 2)  # (B, H, S, D)
    key = torch.cat([inputs["txt_k"], inputs["img_k"]], dim=1).transpose(1, 2)
    value = torch.cat([inputs["txt_v"], inputs["img_v"]], dim=1).transpose(1, 2)
    attn_mask = None
    if txt_mask is not None:
        image_mask = torch.ones(BATCH, inputs["img_q"].shape[1], dtype=torch.bool)
        attn_mask = torch.cat([txt_mask, image_mask], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask).transpose(1, 2)  # (B, S, H, D)
    return out[:, :TXT_LEN], out[:, TXT_LEN:]


def _shard(tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Zero-pad the sequence (dim 1) to a multiple of `world_size` and take chunk `rank`."""
    bounds = sp_shard_bounds(tensor.shape[1], world_size, rank)
    padded = F.pad(tensor, (0, 0, 0, 0, 0, bounds.padded_len - tensor.shape[1]))
    return padded[:, bounds.start : bounds.end]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _mesh_id(ulysses: int, ring: int, cfg: int) -> str:
    return f"u{ulysses}r{ring}" + (f"cfg{cfg}" if cfg > 1 else "")


def _attention_case_id(ulysses: int, ring: int, cfg: int, image_len: int, mask_kind: str) -> str:
    return f"{_mesh_id(ulysses, ring, cfg)}-img{image_len}-{mask_kind}"


# world size -> (ulysses, ring, cfg) meshes; every mesh and case of one world size runs in one spawn.
MESHES = {2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)], 4: [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]}
# world size -> case ids: every mesh x image length x text mask (3 x 5 x 4 = 60 at world 2, 5 x 5 x 4 = 100 at 4)
ATTENTION_CASES = {
    world: [
        _attention_case_id(*mesh, image_len, mask_kind)
        for mesh in meshes
        for image_len in IMAGE_LENGTHS
        for mask_kind in TEXT_MASKS
    ]
    for world, meshes in MESHES.items()
}


def _run_cases(groups: ParallelGroups, mesh: tuple[int, int, int], seed_offset: int = 0) -> dict[str, list[dict]]:
    """Every (image length, text mask) case, CALLS_PER_CASE calls each with fresh inputs: case id -> a record a call."""
    cases = {}
    sp_size, sp_rank = groups.sp_world_size, groups.sp_rank
    for image_len in IMAGE_LENGTHS:
        for mask_kind in TEXT_MASKS:
            txt_mask = _text_mask(mask_kind)
            records = cases[_attention_case_id(*mesh, image_len, mask_kind)] = []
            for call in range(CALLS_PER_CASE):
                seed = seed_offset + 1000 * image_len + 10 * TEXT_MASKS.index(mask_kind) + call
                inputs = _make_inputs(seed, image_len)  # identical on every SP rank of this CFG branch
                ref_txt, ref_img = _reference(inputs, txt_mask)
                backend = "math" if call == 1 else "auto"
                txt_out, img_out = joint_attention(
                    inputs["txt_q"],
                    inputs["txt_k"],
                    inputs["txt_v"],
                    _shard(inputs["img_q"], sp_size, sp_rank),
                    _shard(inputs["img_k"], sp_size, sp_rank),
                    _shard(inputs["img_v"], sp_size, sp_rank),
                    txt_mask=txt_mask,
                    img_valid_len=image_len,
                    groups=groups,
                    backend=backend,
                )
                bounds = sp_shard_bounds(image_len, sp_size, sp_rank)
                expected_img = ref_img[:, bounds.start : bounds.start + bounds.valid_len]
                records.append(
                    {
                        "call": call,
                        "backend": backend,
                        "txt_shape": tuple(txt_out.shape),
                        "img_shape": tuple(img_out.shape),
                        "expected_img_shape": (BATCH, bounds.local_len, HEADS, HEAD_DIM),
                        "txt_diff": _max_diff(txt_out, ref_txt),
                        "img_diff": _max_diff(img_out[:, : bounds.valid_len], expected_img),
                        "finite": bool(torch.isfinite(txt_out).all() and torch.isfinite(img_out).all()),
                    }
                )
    return cases


def _comm_bytes_case(groups: ParallelGroups) -> dict:
    """Bytes of one joint_attention call (image 13 tokens, text mask), as counted by count_communication."""
    inputs = _make_inputs(7, 13)
    sp_size, sp_rank = groups.sp_world_size, groups.sp_rank
    shards = [_shard(inputs[name], sp_size, sp_rank) for name in ("img_q", "img_k", "img_v")]
    with count_communication() as stats:
        joint_attention(
            inputs["txt_q"], inputs["txt_k"], inputs["txt_v"], *shards,
            txt_mask=_text_mask("trailing3"), img_valid_len=13, groups=groups,
        )
    return {"bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received, "calls": dict(stats.calls)}


def _layout(groups: ParallelGroups) -> dict:
    return {
        "sp_rank": groups.sp_rank,
        "sp_world_size": groups.sp_world_size,
        "ulysses_rank": groups.ulysses_rank,
        "ring_rank": groups.ring_rank,
        "cfg_rank": groups.cfg_rank,
        "sp_ranks": groups.sp_ranks,
        "ulysses_ranks": groups.ulysses_ranks,
        "ring_ranks": groups.ring_ranks,
        "cfg_ranks": groups.cfg_ranks,
        "repr": repr(groups),
        "cfg_group_size": None if groups.cfg_group is None else dist.get_world_size(groups.cfg_group),
    }


def _sp_worker(rank: int, world_size: int, meshes: list[tuple[int, int, int]], offset: int = 0) -> dict:
    """Runs in each spawned rank: every mesh (ulysses, ring, cfg) x every case; returns case id -> its numbers."""
    # run_distributed plumbing: positional and keyword arguments arrive, the group is initialised.
    total = torch.tensor([rank + offset])
    dist.all_reduce(total)
    # Every rank ends up with rank 0's structure and values.
    mine = (torch.full((2, 3), float(rank)), None, {"ids": torch.arange(4) + rank, "n": rank}, [torch.ones(1).bool()])
    out = {"plumbing": {"rank": rank, "all_reduce": total, "broadcast": broadcast_from_rank0(mine)}}
    out["comm-functional"] = _functional_vs_c10d_bytes()
    try:
        ParallelGroups.create(ulysses_degree=3, ring_degree=1)
        out["degree_error"] = None
    except ValueError as error:
        out["degree_error"] = str(error)
    for mesh in meshes:
        ulysses, ring, cfg = mesh
        groups = ParallelGroups.create(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=cfg)
        out[f"layout-{_mesh_id(*mesh)}"] = _layout(groups)
        # CFG branches get different inputs: a group leaking across branches would show up as a mismatch.
        out.update(_run_cases(groups, mesh, seed_offset=100_000 * groups.cfg_rank))
        out[f"comm-{_mesh_id(*mesh)}"] = _comm_bytes_case(groups)
    return out


def _functional_vs_c10d_bytes() -> dict:
    """The same traffic through functional collectives (diffusers' CP, compiled code) and through c10d."""
    import torch.distributed._functional_collectives as funcol

    chunk = torch.ones(4, 8)  # 128 bytes
    with count_communication() as functional:
        funcol.wait_tensor(funcol.all_to_all_single(chunk, None, None, group=dist.group.WORLD))
        funcol.wait_tensor(funcol.all_gather_tensor(chunk, 0, group=dist.group.WORLD))
        funcol.wait_tensor(funcol.all_reduce(chunk, "sum", group=dist.group.WORLD))
    with count_communication() as c10d:
        dist.all_to_all_single(torch.empty_like(chunk), chunk)
        dist.all_gather_into_tensor(torch.empty(4 * dist.get_world_size(), 8), chunk)
        dist.all_reduce(chunk.clone())
    return {name: (stats.bytes_sent, stats.bytes_received, dict(stats.calls), dict(stats.bytes_sent_by_op))
            for name, stats in (("functional", functional), ("c10d", c10d))}


def _expected_comm_bytes(ulysses: int, ring: int, image_len: int) -> int:
    """Bytes one rank sends in one joint_attention call (fp32), worked out from the algorithm."""
    world = ulysses * ring
    local = -(-image_len // world)
    per_token = BATCH * HEADS * HEAD_DIM * 4  # bytes of one token's (H, D) row over the batch
    sent = 0
    if ulysses > 1:
        # forward: Q, K, V of our local tokens, all but our own head chunk
        sent += 3 * local * per_token * (ulysses - 1) // ulysses
        # backward: [text, image chunk] rows with our H/U heads, to every other ulysses rank
        sent += (TXT_LEN + local) * (per_token // ulysses) * (ulysses - 1)
    if ring > 1:
        # (ring - 1) steps, each K and V of one ring block: ulysses * local tokens, H/U heads
        sent += (ring - 1) * 2 * (ulysses * local) * (per_token // ulysses)
    return sent


# (world size, mesh id) -> (collectives of one call, bytes one rank sends, or None where not checked)
COMMUNICATION = {
    (2, "u2r1"): ({"all_to_all": 2}, _expected_comm_bytes(2, 1, 13)),
    (2, "u1r2"): ({"p2p": 1}, _expected_comm_bytes(1, 2, 13)),
    (2, "u1r1cfg2"): ({}, None),  # SP world 1: no collective
    (4, "u4r1"): ({"all_to_all": 2}, _expected_comm_bytes(4, 1, 13)),
    (4, "u1r4"): ({"p2p": 3}, _expected_comm_bytes(1, 4, 13)),
    (4, "u2r2"): ({"all_to_all": 2, "p2p": 1}, _expected_comm_bytes(2, 2, 13)),
}

# (world size, mesh id) -> layout field -> its value on each rank, in rank order.
# Rank layout: rank = cfg * (ring * ulysses) + ring * ulysses + ulysses (ulysses ranks contiguous).
LAYOUTS = {
    (2, "u1r1cfg2"): {"cfg_rank": [0, 1], "sp_world_size": [1, 1], "cfg_ranks": [[0, 1], [0, 1]]},
    (4, "u2r2"): {
        "ring_rank": [0, 0, 1, 1],
        "ulysses_rank": [0, 1, 0, 1],
        "sp_rank": [0, 1, 2, 3],
        "ring_ranks": [[0, 2], [1, 3], [0, 2], [1, 3]],
        "ulysses_ranks": [[0, 1], [0, 1], [2, 3], [2, 3]],
    },
    (4, "u2r1cfg2"): {
        "cfg_rank": [0, 0, 1, 1],
        "sp_ranks": [[0, 1], [0, 1], [2, 3], [2, 3]],
        "cfg_ranks": [[0, 2], [1, 3], [0, 2], [1, 3]],
        "cfg_group_size": [2, 2, 2, 2],
    },
    (4, "u1r2cfg2"): {"ring_ranks": [[0, 1], [0, 1], [2, 3], [2, 3]]},
}
# (world size, mesh id) -> what rank 0's repr of the groups must contain
LAYOUT_REPRS = {(4, "u1r2cfg2"): ["ring=2", "cfg=2"]}


def _by_world(keys) -> dict[int, list[str]]:
    cases: dict[int, list[str]] = {}
    for world, case in keys:
        cases.setdefault(world, []).append(case)
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process parity: one spawn per world size (the fixture), one test per case
# ---------------------------------------------------------------------------------------------------------------------


spawned = spawn_fixture(
    _sp_worker,
    Spawn(2, args=(MESHES[2],), kwargs={"offset": 10}, timeout=120.0),
    Spawn(4, args=(MESHES[4],), timeout=180.0),
)


@pytest.mark.distributed
def test_run_distributed_plumbing(spawned):
    plumbing = spawned[2].case("plumbing")
    assert [result["rank"] for result in plumbing] == [0, 1]  # one return value per rank, in rank order
    assert [result["all_reduce"].item() for result in plumbing] == [21, 21]  # (0 + 10) + (1 + 10)
    for result in plumbing:
        tensor, none, mapping, listed = result["broadcast"]
        assert torch.equal(tensor, torch.zeros(2, 3)) and none is None
        assert torch.equal(mapping["ids"], torch.arange(4)) and mapping["n"] == 0
        assert isinstance(listed, list) and listed[0].dtype == torch.bool


@pytest.mark.distributed
def test_parallel_groups_reject_degrees_that_do_not_multiply_to_the_world(spawned):
    assert "1 * 1 * 3 = 3, but the world size is 2" in spawned[2].case("degree_error")[0]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, case", world_cases(ATTENTION_CASES))
def test_joint_attention(spawned, world_size, case):
    # CALLS_PER_CASE calls with fresh inputs, every one checked on every rank: a collective read before it completes
    # shows up as a random bad call.
    failures = []
    for rank, records in enumerate(spawned[world_size].case(case)):
        assert [record["call"] for record in records] == list(range(CALLS_PER_CASE)), f"rank {rank}: calls missing"
        for record in records:
            ok = (
                record["finite"]
                and record["txt_diff"] <= TOL
                and record["img_diff"] <= TOL
                and record["txt_shape"] == (BATCH, TXT_LEN, HEADS, HEAD_DIM)
                and record["img_shape"] == record["expected_img_shape"]
            )
            if not ok:
                failures.append(f"rank {rank}/{world_size} {record}")
    assert not failures, f"{len(failures)} mismatching calls:\n" + "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, mesh", world_cases(_by_world(COMMUNICATION)))
def test_communication_of_one_call(spawned, world_size, mesh):
    calls, bytes_sent = COMMUNICATION[(world_size, mesh)]
    for rank, comm in enumerate(spawned[world_size].case(f"comm-{mesh}")):
        assert comm["calls"] == calls, f"rank {rank}: {comm}"
        if bytes_sent is not None:
            assert comm["bytes_sent"] == bytes_sent, f"rank {rank}: {comm}"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_count_communication_sees_functional_collectives_like_c10d(spawned, world_size):
    per_op = {"all_to_all": 128 * (world_size - 1) // world_size, "all_gather": 128 * (world_size - 1),
              "all_reduce": 128}  # a 128-byte chunk: P - 1 of P parts, P - 1 copies, once
    for rank, counted in enumerate(spawned[world_size].case("comm-functional")):
        assert counted["functional"] == counted["c10d"], f"rank {rank}: {counted}"
        assert counted["c10d"][3] == per_op and counted["c10d"][2] == dict.fromkeys(per_op, 1), f"rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, mesh", world_cases(_by_world(LAYOUTS)))
def test_group_layout(spawned, world_size, mesh):
    layouts = spawned[world_size].case(f"layout-{mesh}")
    for name, per_rank in LAYOUTS[(world_size, mesh)].items():
        assert [layout[name] for layout in layouts] == per_rank, name
    for part in LAYOUT_REPRS.get((world_size, mesh), []):
        assert part in layouts[0]["repr"], layouts[0]["repr"]


# ---------------------------------------------------------------------------------------------------------------------
# run_distributed never hangs
# ---------------------------------------------------------------------------------------------------------------------


def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever without the parent killing it
    return rank


def _sleep_forever(rank: int, world_size: int) -> None:
    time.sleep(10_000)


@pytest.mark.distributed
def test_run_distributed_reraises_a_rank_error():
    start = time.monotonic()
    with pytest.raises(DistributedProcessError, match="deliberate failure on rank 1") as info:
        run_distributed(_raise_on_rank1, 2, timeout=60.0)
    assert info.value.rank == 1
    assert "Traceback" in info.value.traceback_text
    assert time.monotonic() - start < 55.0


@pytest.mark.distributed
def test_run_distributed_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within"):
        run_distributed(_sleep_forever, 2, timeout=3.0)
    assert time.monotonic() - start < 15.0


# ---------------------------------------------------------------------------------------------------------------------
# Single-process: kernels, merge, validation
# ---------------------------------------------------------------------------------------------------------------------


def _sdpa_with_lse(query, key, value, key_mask=None):
    q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))  # (B, H, S, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
    return out, lse


@pytest.mark.parametrize("backend", ["math", "_native_flash", "auto"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_matches_sdpa(backend, masked):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 5, 3, 16, generator=generator)
    key = torch.randn(2, 9, 3, 16, generator=generator)
    value = torch.randn(2, 9, 3, 16, generator=generator)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, 9, dtype=torch.bool)
        key_mask[0, 2] = key_mask[0, 7:] = False
        key_mask[1, :4] = False
    out, lse = attention_with_lse(query, key, value, key_mask=key_mask, backend=backend)
    ref_out, ref_lse = _sdpa_with_lse(query, key, value, key_mask)
    assert out.shape == (2, 5, 3, 16) and out.dtype == torch.float32
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32  # LSE layout: (B, H, Sq)
    assert _max_diff(out, ref_out) <= TOL
    assert _max_diff(lse, ref_lse) <= TOL


@pytest.mark.parametrize("backend", ["math", "_native_flash"])
def test_attention_with_lse_bf16_and_scale(backend):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 7, 2, 32, generator=generator) for _ in range(3))
    out, lse = attention_with_lse(query.bfloat16(), key.bfloat16(), value.bfloat16(), scale=0.3, backend=backend)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)), scale=0.3).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert _max_diff(out, ref) < 3e-2


@pytest.mark.parametrize("backend", ["math", "_native_flash", "auto"])
def test_fully_masked_rows_give_zero_and_minus_inf(backend):
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, 2, 8, generator=generator)
    key = torch.randn(2, 6, 2, 8, generator=generator)
    value = torch.randn(2, 6, 2, 8, generator=generator)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[1] = False  # sample 1: a pure-padding block
    out, lse = attention_with_lse(query, key, value, key_mask=key_mask, backend=backend)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
    # No key at all: same convention.
    empty_out, empty_lse = attention_with_lse(query, key[:, :0], value[:, :0], backend=backend)
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()


@pytest.mark.parametrize("backend", ["math", "_native_flash"])
def test_merge_of_two_halves_equals_whole(backend):
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 5, 3, 8, generator=generator)
    key = torch.randn(2, 12, 3, 8, generator=generator)
    value = torch.randn(2, 12, 3, 8, generator=generator)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, 1] = False
    key_mask[1, 6:] = False  # sample 1: second half fully masked
    whole_out, whole_lse = attention_with_lse(query, key, value, key_mask=key_mask, backend=backend)
    out_a, lse_a = attention_with_lse(query, key[:, :6], value[:, :6], key_mask=key_mask[:, :6], backend=backend)
    out_b, lse_b = attention_with_lse(query, key[:, 6:], value[:, 6:], key_mask=key_mask[:, 6:], backend=backend)
    merged_out, merged_lse = merge_attention_blocks(out_a, lse_a, out_b, lse_b)
    assert merged_out.dtype == torch.float32 and merged_lse.shape == (2, 3, 5)
    assert _max_diff(merged_out, whole_out) <= TOL
    assert _max_diff(merged_lse, whole_lse) <= TOL
    # Order does not matter, and both blocks empty gives 0 / -inf without NaN.
    swapped_out, _ = merge_attention_blocks(out_b, lse_b, out_a, lse_a)
    assert _max_diff(swapped_out, whole_out) <= TOL
    minus_inf = torch.full_like(lse_a, float("-inf"))
    zeros = torch.zeros_like(out_a)
    empty_out, empty_lse = merge_attention_blocks(zeros, minus_inf, zeros, minus_inf)
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()


def test_attention_backend_errors():
    query = torch.randn(1, 3, 2, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention backend='nope' is unknown"):
        attention_with_lse(query, query, query, backend="nope")
    # The names of earlier releases say which of diffusers' names replaced them.
    for old, new in (("cpu_flash", "_native_flash"), ("efficient", "_native_efficient"), ("flash_attn", "flash")):
        with pytest.raises(ValueError, match=f"now called '{new}'"):
            attention_with_lse(query, query, query, backend=old)
    with pytest.raises(ValueError, match="takes no mask"):  # flash-attn, whether installed or not
        attention_with_lse(query, query, query, key_mask=mask, backend="flash")
    with pytest.raises(ValueError, match=r"key_mask.*\(1, 3\)"):
        attention_with_lse(query, query, query, key_mask=torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("groups", [None, ParallelGroups()])
@pytest.mark.parametrize("mask_kind", TEXT_MASKS)
def test_joint_attention_single_process(groups, mask_kind):
    inputs = _make_inputs(4, 11)
    txt_mask = _text_mask(mask_kind)
    ref_txt, ref_img = _reference(inputs, txt_mask)
    # A padded image (11 real tokens + 3 zeros) as a 1-rank shard: padding must not be attended.
    padded = {name: F.pad(t, (0, 0, 0, 0, 0, 3)) if name.startswith("img") else t for name, t in inputs.items()}
    with count_communication() as stats:
        txt_out, img_out = joint_attention(**padded, txt_mask=txt_mask, img_valid_len=11, groups=groups)
    assert stats.bytes_sent == 0 and stats.calls == {}
    assert txt_out.shape == (BATCH, TXT_LEN, HEADS, HEAD_DIM) and img_out.shape == (BATCH, 14, HEADS, HEAD_DIM)
    assert _max_diff(txt_out, ref_txt) <= TOL
    assert _max_diff(img_out[:, :11], ref_img) <= TOL
    assert torch.isfinite(img_out).all()


def test_joint_attention_validation():
    inputs = _make_inputs(5, 8)
    three_way = ParallelGroups(ulysses_degree=3)  # 4 heads cannot be split over 3 ranks
    with pytest.raises(ValueError, match=r"heads \(4\) is not divisible by ulysses_degree \(3\)"):
        joint_attention(**inputs, txt_mask=None, img_valid_len=8, groups=three_way)
    with pytest.raises(ValueError, match="img_valid_len"):
        joint_attention(**inputs, txt_mask=None, img_valid_len=9, groups=None)
    with pytest.raises(ValueError, match="txt_mask"):
        joint_attention(**inputs, txt_mask=torch.ones(BATCH, 3, dtype=torch.bool), img_valid_len=8, groups=None)


def test_parallel_groups_validation_and_shard_bounds(monkeypatch):
    assert not dist.is_initialized()
    groups = ParallelGroups.create(ulysses_degree=1, ring_degree=1)
    assert (groups.sp_world_size, groups.sp_rank, groups.ring_ranks, groups.sp_group) == (1, 0, [0], None)
    assert "ulysses=1" in repr(groups)
    with pytest.raises(ValueError, match=r"1 \* 2 \* 2 = 4, but the world size is 1"):
        ParallelGroups.create(ulysses_degree=2, ring_degree=2)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelGroups.create(ulysses_degree=0, ring_degree=1)
    # 5 tokens over 4 ranks: chunks of 2 -> [0, 2) [2, 4) [4, 6) [6, 8); rank 2 holds 1 real token, rank 3 none.
    # (start, end, local_len, padded_len, valid_len, seq_len)
    assert sp_shard_bounds(5, 4, 2) == (4, 6, 2, 8, 1, 5)
    assert sp_shard_bounds(5, 4, 3).valid_len == 0
    assert sp_shard_bounds(13, 2, 1) == (7, 14, 7, 14, 6, 13)
    assert sp_shard_bounds(1, 2, 1).is_sharded and not sp_shard_bounds(7, 1, 0).is_sharded
    # A shard owns its storage: a contiguous narrow (batch 1) must not keep the whole sequence alive in a view.
    whole = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    for batch in (whole[:1], whole):
        shard = take_shard(batch, 1, sp_shard_bounds(8, 2, 1))
        assert torch.equal(shard, batch[:, 4:8]) and shard.is_contiguous()
        assert shard.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        init_distributed()



def test_init_distributed_from_launcher_env(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not dist.is_initialized()
    try:
        init_distributed(timeout=30.0, backend="gloo")
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        init_distributed()  # already initialised: no-op
        groups = ParallelGroups.create(ulysses_degree=1, ring_degree=1)
        assert (groups.rank, groups.world_size, groups.sp_group) == (0, 1, None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
