"""Regional compilation (`compile_repeated_blocks`, diffusers' documented way to compile Qwen-Image) under sequence
parallelism, on CPU with gloo, against eager (fp32).

- Ulysses compiles whole: `fullgraph=True` with inductor (the blocks hold no Python state, so dynamo traces the
  all-to-all collectives into the graph).
- Ring compiles with `fullgraph=False`: point-to-point ops are not traceable, so each block breaks at the P2P of the
  ring step and nowhere else (checked from dynamo's graph-break counters). aot_eager keeps the test short: the breaks
  are dynamo's, the same for every backend.

Tolerance: max abs diff <= 1e-4 against the single-process eager output and against SP eager, on each of two calls.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_qwen_sp import QwenImageSPTransformer2DModel
from diffusers_qwen_sp.hooks import SequenceParallelConfig, apply_sequence_parallel
from diffusers_qwen_sp.testing import tiny_transformer_config

from _spawn import Spawn, spawn_fixture


pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOLERANCE = 1e-4
# case -> (ulysses, ring, fullgraph, backend)
CASES = {"ulysses2_fullgraph_inductor": (2, 1, True, "inductor"), "ring2_breaks_at_p2p": (1, 2, False, "aot_eager")}


def _inputs(config) -> dict:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # the second prompt is 4 tokens shorter
    return dict(
        hidden_states=torch.randn(2, 35, config["in_channels"], generator=generator),  # 5x7: odd, padded under SP
        encoder_hidden_states=torch.randn(2, 11, config["joint_attention_dim"], generator=generator),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.9, 0.4]),
        img_shapes=[[(1, 5, 7)]] * 2,
        return_dict=False,
    )


def _compile_worker(rank: int, world_size: int) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    results = {}
    for name, (ulysses, ring, fullgraph, backend) in CASES.items():
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = QwenImageSPTransformer2DModel(**tiny_transformer_config()).eval()
        kwargs = _inputs(model.config)
        with torch.no_grad():
            single = model(**kwargs)[0]
            apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
            eager = model(**kwargs)[0]
            model.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)
            compiled = [model(**kwargs)[0] for _ in range(2)]
        results[name] = {
            "vs_single": [(output - single).abs().max().item() for output in compiled],
            "vs_eager": [(output - eager).abs().max().item() for output in compiled],
            "graph_breaks": sorted(reason.splitlines()[0].strip() for reason in counters["graph_break"]),
            "graphs": counters["stats"]["unique_graphs"],
        }
    return results


# Both ranks compile at once: about a minute on 2 idle cores for inductor.
compiled = spawn_fixture(_compile_worker, Spawn(2, timeout=280))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_blocks_equal_eager(compiled, case: str) -> None:
    for rank, result in enumerate(compiled[2].case(case)):
        assert max(result["vs_single"]) <= TOLERANCE, (rank, result)
        assert max(result["vs_eager"]) <= TOLERANCE, (rank, result)
        assert result["graphs"] >= 1, (rank, result)  # it did compile


@pytest.mark.timeout(300)
def test_ulysses_compiles_whole_and_ring_breaks_only_at_p2p(compiled) -> None:
    for rank, results in enumerate(compiled[2].per_rank()):
        # fullgraph=True raises on any break, so reaching here proves it; the counters agree
        assert results["ulysses2_fullgraph_inductor"]["graph_breaks"] == [], rank
        breaks = results["ring2_breaks_at_p2p"]["graph_breaks"]
        assert breaks, f"rank {rank}: Ring compiled without a break: the P2P exchange must break the graph"
        assert all("P2P" in reason for reason in breaks), (rank, breaks)
