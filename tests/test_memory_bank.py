"""MemoryBank: ring semantics, state_dict, and the all-gather across 2 gloo processes."""
import pytest
import torch
import torch.multiprocessing as mp

from kcl_ext import MemoryBank, kpos_loss
from _harness import free_port, init_gloo


def keys_of(values, dim=3):
    return torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, dim)


def test_new_bank_is_empty():
    bank = MemoryBank(5, 3)
    assert len(bank) == 0 and not bank.is_full
    assert torch.equal(bank.labels, torch.full((5,), -1))
    assert torch.equal(bank.keys, torch.zeros(5, 3))


def test_enqueue_fills_in_order_then_wraps_around():
    bank = MemoryBank(5, 3)
    bank.enqueue(keys_of([1, 2, 3]), torch.tensor([10, 20, 30]))
    assert bank.labels.tolist() == [10, 20, 30, -1, -1]
    assert int(bank.pointer) == 3 and len(bank) == 3
    bank.enqueue(keys_of([4, 5, 6]), torch.tensor([40, 50, 60]))
    # 4, 5 take the last two slots, 6 overwrites the oldest entry (1).
    assert bank.labels.tolist() == [60, 20, 30, 40, 50]
    assert bank.keys[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert int(bank.pointer) == 1 and bank.is_full and len(bank) == 5


def test_batch_longer_than_bank_keeps_the_newest():
    bank = MemoryBank(4, 3)
    bank.enqueue(keys_of([1]), torch.tensor([1]))
    bank.enqueue(keys_of([2, 3, 4, 5, 6, 7]), torch.tensor([2, 3, 4, 5, 6, 7]))
    # Entries 2..7 would go to slots 1,2,3,0,1,2: the survivors are 4..7 in slots 3,0,1,2.
    assert bank.labels.tolist() == [5, 6, 7, 4]
    assert int(bank.pointer) == 3 and int(bank.total_enqueued) == 7


def test_state_dict_round_trip():
    bank = MemoryBank(4, 3)
    bank.enqueue(keys_of([1, 2, 3]), torch.tensor([7, 8, 9]))
    other = MemoryBank(4, 3)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.keys, bank.keys) and torch.equal(other.labels, bank.labels)
    assert int(other.pointer) == 3 and len(other) == 3
    other.enqueue(keys_of([4]), torch.tensor([1]))
    assert other.labels.tolist() == [7, 8, 9, 1]


def test_enqueue_rejects_bad_shapes():
    bank = MemoryBank(4, 3)
    with pytest.raises(ValueError, match=r"keys must be \[B, 3\]"):
        bank.enqueue(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):
        bank.enqueue(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="size and dim"):
        MemoryBank(0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtype_and_device_are_the_models(dtype):
    """A bank of the model's dtype meets kpos_loss without a cast (bfloat16 features against a
    float32 bank are a dtype error outside autocast)."""
    bank = MemoryBank(16, 4, dtype=dtype, device="cpu")
    assert bank.keys.dtype == dtype and bank.keys.device.type == "cpu"
    assert bank.labels.dtype == torch.int64 and bank.dim == 4
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(16, 4, generator=g), dim=1)
    bank.enqueue(keys, torch.arange(16) % 3)            # float32 keys: cast to the bank's dtype
    assert torch.equal(bank.keys, keys.to(dtype))
    query = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1).to(dtype)
    loss = kpos_loss(query.requires_grad_(), query.detach(), bank.keys, torch.arange(5) % 3,
                     bank.labels, k=2, seed=0)
    assert loss.dtype == dtype and torch.isfinite(loss)
    with pytest.raises(ValueError, match="MemoryBank: dtype must be one of"):
        MemoryBank(4, 3, dtype=torch.int64)


def test_enqueue_rejects_float_labels_as_kpos_loss_does():
    bank = MemoryBank(4, 3)
    with pytest.raises(TypeError, match=r"MemoryBank.enqueue: labels must have an integer dtype"):
        bank.enqueue(torch.zeros(2, 3), torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match=r"MemoryBank.enqueue: labels must have an integer dtype"):
        bank.enqueue(torch.zeros(2, 3), torch.tensor([True, False]))
    with pytest.raises(TypeError, match=r"MemoryBank.enqueue: keys must be a floating tensor"):
        bank.enqueue(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    assert len(bank) == 0 and bank.labels.tolist() == [-1] * 4     # nothing was written
    bank.enqueue(torch.ones(2, 3), torch.tensor([3, 4], dtype=torch.int16))
    assert bank.labels.tolist() == [3, 4, -1, -1]


def test_repr_says_size_dim_filled_and_dtype():
    bank = MemoryBank(8, 3, dtype=torch.bfloat16)
    bank.enqueue(torch.ones(5, 3), torch.arange(5))
    text = repr(bank)
    for part in ("size=8", "dim=3", "filled=5", "dtype=torch.bfloat16"):
        assert part in text, text


def test_public_methods_have_docstrings():
    for name in ("__init__", "enqueue", "size", "dim", "is_full", "__len__"):
        member = getattr(MemoryBank, name)
        doc = (member.fget if isinstance(member, property) else member).__doc__
        assert doc and doc.strip(), f"MemoryBank.{name} has no docstring"
    assert "Args:" in MemoryBank.__doc__ and "Raises:" in MemoryBank.enqueue.__doc__
    # Both orders are shown: MoCo's (enqueue before backward) and enqueue after backward.
    assert "bank.enqueue(k, y)\n        loss.backward()" in MemoryBank.__doc__
    assert "loss.backward()\n        bank.enqueue(k, y)" in MemoryBank.__doc__


def _gather_worker(rank, world, port, result):
    init_gloo(rank, world, port)
    try:
        bank = MemoryBank(6, 2)
        for step in range(2):  # 2 steps x 2 ranks x 2 rows = 8 entries: wraps a 6-slot bank
            keys = torch.full((2, 2), float(100 * step + 10 * rank))
            keys[1] += 1
            labels = torch.tensor([100 * step + 10 * rank, 100 * step + 10 * rank + 1])
            bank.enqueue(keys, labels)
        result[rank] = (bank.keys.clone(), bank.labels.clone(), int(bank.pointer))
    finally:
        torch.distributed.destroy_process_group()


def test_enqueue_gathers_across_two_gloo_processes():
    world = 2
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_gather_worker, args=(world, free_port(), result), nprocs=world)
        result = dict(result)
    # Rank order within a step: [rank 0 rows, rank 1 rows]. Step 0 fills slots 0..3 with
    # 0, 1, 10, 11; step 1 writes 100, 101, 110, 111 into slots 4, 5, 0, 1.
    expected = [110, 111, 10, 11, 100, 101]
    for rank in range(world):
        keys, labels, pointer = result[rank]
        assert labels.tolist() == expected
        assert keys[:, 0].tolist() == [float(x) for x in expected]
        assert pointer == 2
