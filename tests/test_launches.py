"""One launch per (param group, dtype combination, variant), whatever the tensor count."""
from __future__ import annotations

import pytest
import torch

from helpers import PAIRS, random_grads
from reference import Reference, assert_same_bits
from tritonadam.kernels import launch_counts

LAUNCH = {"block_size": 16384, "num_warps": 4}


def _launches_per_step(opt, params, steps=3):
    gen = torch.Generator().manual_seed(0)
    kind = "adamax" if type(opt).__name__ == "Adamax" else "adam"
    counts = []
    for _ in range(steps):
        for p, g in zip(params, random_grads(params, gen)):
            p.grad = g
        before = launch_counts[kind]
        opt.step()
        counts.append(launch_counts[kind] - before)
    return counts


@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_launches_do_not_grow_with_tensor_count(name, device):
    cls = PAIRS[name][0]
    one = [torch.nn.Parameter(torch.randn(64, device=device))]
    many = [torch.nn.Parameter(torch.randn(1 + i % 13, device=device)) for i in range(500)]
    assert _launches_per_step(cls(one, **LAUNCH), one) == [1, 1, 1]
    assert _launches_per_step(cls(many, **LAUNCH), many) == [1, 1, 1]


def test_one_launch_per_dtype_combination_and_group(device):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    groups = [
        {"params": [torch.nn.Parameter(torch.randn(5 + i, device=device).to(dtypes[i % 4]))
                    for i in range(40)]},
        {"params": [torch.nn.Parameter(torch.randn(3, device=device))], "lr": 1e-2},
    ]
    opt = PAIRS["Adam"][0](groups, **LAUNCH)
    params = groups[0]["params"] + groups[1]["params"]
    assert _launches_per_step(opt, params) == [5, 5, 5]


def test_hundreds_of_mixed_tensors_match_reference(device):
    """Many small tensors of mixed dtypes in one optimizer, each checked bit for bit."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    gen = torch.Generator().manual_seed(3)
    params = [
        torch.nn.Parameter(torch.randn(int(torch.randint(0, 300, (1,), generator=gen)), generator=gen)
                           .to(dtypes[i % 4]).to(device))
        for i in range(300)
    ]
    refs = [Reference(p, "adam", master=True) for p in params]
    opt = PAIRS["AdamW"][0](params, lr=1e-2, weight_decay=0.1, master_weights=True, **LAUNCH)
    for _ in range(3):
        grads = random_grads(params, gen)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for p, r, g in zip(params, refs, grads):
            expected = r.update(g.cpu(), 1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled=True)
            if p.dtype == torch.float64:
                torch.testing.assert_close(p.detach().cpu(), expected, atol=1e-12, rtol=1e-11)
            else:
                assert_same_bits(p, expected)


@pytest.mark.parametrize("name", ["AdamW", "Adamax"])
def test_persistent_grid_gives_the_same_bits(name, device):
    """A persistent grid (a few programs looping over all blocks) computes exactly what one
    program per block does, step counts included, in one launch."""
    cls = PAIRS[name][0]
    shapes = [(1,), (0,), (4097,), (3, 700), ()] * 3
    a = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device))
         for i, s in enumerate(shapes)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    launch = {"block_size": 1024, "num_warps": 4}
    one_per_block = cls(a, master_weights=True, **launch)
    persistent = cls(b, master_weights=True, persistent=True, **launch)
    assert _launches_per_step(one_per_block, a) == [1, 1, 1]
    assert _launches_per_step(persistent, b) == [1, 1, 1]
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert persistent.state[q]["step"].item() == 3
