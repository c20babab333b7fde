"""The harness's own collectives (harness/parallel.py), on 2 CPU processes over gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stepdistill.harness.parallel import all_reduce_mean_


def _grads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    shapes = [(4, 3), (7,), (2, 2, 5), (1,)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return grads + [torch.randn(3, generator=gen, dtype=torch.float64)]  # a second dtype: a second bucket


def _worker(rank: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        bucketed = _grads(rank)
        collectives = all_reduce_mean_(bucketed)
        one_by_one = []
        for g in _grads(rank):
            dist.all_reduce(g)
            one_by_one.append(g / 2)
        if rank == 0:
            torch.save({"bucketed": bucketed, "one_by_one": one_by_one, "collectives": collectives}, out)
    finally:
        dist.destroy_process_group()


def test_bucketed_mean_equals_one_collective_per_tensor(tmp_path):
    out = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    result = torch.load(out, weights_only=True)
    assert result["collectives"] == 2  # float32 and float64, not one per tensor (5)
    expected = [(a + b) / 2 for a, b in zip(_grads(0), _grads(1))]
    for got, ref, want in zip(result["bucketed"], result["one_by_one"], expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, ref)  # bit for bit what per-tensor reduction gives
        torch.testing.assert_close(got, want)


def test_one_process_is_a_no_op():
    grads = _grads(0)
    before = [g.clone() for g in grads]
    assert all_reduce_mean_(grads) == 0
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
