"""P x K identity samplers: batch structure, epoch length, seeding, resume, distributed split."""
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reidlib.data import DistributedIdentitySampler, RandomIdentitySampler

# 20 identities with 1..9 images each, items interleaved as a real list would be.
RNG = np.random.default_rng(0)
PIDS = RNG.permutation(np.repeat(np.arange(20), RNG.integers(1, 10, 20))).tolist()
ITEMS = [(f"img{i}.jpg", pid, i % 3) for i, pid in enumerate(PIDS)]


def check_pk(batches, pids, p, k):
    for batch in batches:
        assert len(batch) == p * k
        groups = [batch[i:i + k] for i in range(0, len(batch), k)]
        assert [len({pids[i] for i in g}) for g in groups] == [1] * p  # K adjacent images of one pid
        assert Counter(pids[i] for i in batch) == {pids[g[0]]: k for g in groups}  # P pids, K each


def test_batches_hold_p_identities_k_times_each():
    sampler = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=0)
    batches = sampler.batches()
    check_pk(batches, PIDS, 4, 4)
    flat = list(sampler)
    assert len(flat) == len(sampler) == 16 * len(batches) > 0
    assert flat == [i for b in batches for i in b]


def test_identities_with_few_images_are_drawn_with_replacement():
    pids = [0, 1, 1, 2, 2, 2, 2, 2]  # pid 0 has one image, pid 1 two
    batches = RandomIdentitySampler(pids, batch_size=12, num_instance=4, seed=0).batches()
    assert len(batches) == 1
    check_pk(batches, pids, 3, 4)
    assert Counter(batches[0])[0] == 4


def test_epoch_length_follows_the_reference():
    sampler = RandomIdentitySampler(PIDS, batch_size=16, num_instance=4, seed=0)
    assert sampler.nominal_length == sum(max(n, 4) // 4 * 4 for n in Counter(PIDS).values())
    for epoch in range(5):
        sampler.set_epoch(epoch)
        assert len(sampler) % 16 == 0 and len(sampler) <= sampler.nominal_length
        used = Counter(PIDS[i] for i in sampler)
        left = [pid for pid, n in Counter(PIDS).items() if used[pid] < max(n, 4) // 4 * 4]
        assert len(left) < 4  # it stops only when fewer than P identities have groups left


def test_order_depends_only_on_seed_and_epoch():
    a = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=7)
    b = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=7)
    for epoch in (0, 3, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)
    c = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=8)
    assert list(c) != list(a)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch


def test_state_round_trip_resumes_the_same_order():
    a = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=3)
    a.set_epoch(5)
    state = a.state_dict()
    b = RandomIdentitySampler(ITEMS, batch_size=16, num_instance=4, seed=0)
    b.load_state_dict(state)
    assert b.epoch == 5 and list(b) == list(a)
    with pytest.raises(ValueError, match="batch_size"):
        RandomIdentitySampler(ITEMS, batch_size=32, num_instance=4).load_state_dict(state)


def test_dataloader_batches_are_the_sampler_batches():
    sampler = RandomIdentitySampler(PIDS, batch_size=8, num_instance=2, seed=0)
    loader = DataLoader(range(len(PIDS)), batch_size=8, sampler=sampler, drop_last=True)
    assert [b.tolist() for b in loader] == sampler.batches()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_ranks_share_each_step_by_identity(world):
    ranks = [DistributedIdentitySampler(ITEMS, batch_size=32, num_instance=4, seed=1, rank=r, world_size=world)
             for r in range(world)]
    single = RandomIdentitySampler(ITEMS, batch_size=32, num_instance=4, seed=1)
    for epoch in (0, 2):
        for s in ranks + [single]:
            s.set_epoch(epoch)
        per_rank = [s.batches() for s in ranks]
        assert len({len(b) for b in per_rank}) == 1 and len({len(s) for s in ranks}) == 1
        for step, global_batch in enumerate(single.batches()):
            pids_by_rank = [{PIDS[i] for i in b[step]} for b in per_rank]
            assert all(len(p) == 8 // world for p in pids_by_rank)
            assert len(set().union(*pids_by_rank)) == 8  # disjoint identities across ranks
            assert [i for b in per_rank for i in b[step]] == global_batch
        for batches in per_rank:
            check_pk(batches, PIDS, 8 // world, 4)
    assert ranks[0].per_rank_batch_size == 32 // world


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of num_instance"):
        RandomIdentitySampler(PIDS, batch_size=10, num_instance=4)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        RandomIdentitySampler([0, 1, 2], batch_size=16, num_instance=4)
    with pytest.raises(ValueError, match="split over"):
        DistributedIdentitySampler(PIDS, batch_size=12, num_instance=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        DistributedIdentitySampler(PIDS, batch_size=16, num_instance=4, rank=2, world_size=2)


def test_distributed_defaults_to_one_process_without_torch_distributed():
    assert not torch.distributed.is_initialized()
    s = DistributedIdentitySampler(PIDS, batch_size=16, num_instance=4, seed=2)
    assert (s.rank, s.world_size) == (0, 1)
    assert list(s) == list(RandomIdentitySampler(PIDS, batch_size=16, num_instance=4, seed=2))
