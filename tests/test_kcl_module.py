"""kcl_ext.KCL, the method as one module: in a user's own ten-line loop with a user's encoder; its
loss is kpos_loss on the encoders' unit features against the bank; MoCo (k=0) and FCL (k=-1)
are the same module; the bank, the momentum update and the package's contents."""
import copy
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kcl_ext
from kcl_ext import KCL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_encoder(dim=8):
    """Someone's own encoder: any module from images to [N, dim] features (with BatchNorm)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dim))


def views(step, n=8):
    g = torch.Generator().manual_seed(step)
    images = torch.randn(n, 1, 12, 12, generator=g)
    noise = 0.1 * torch.randn(2, n, 1, 12, 12, generator=g)
    return images + noise[0], images + noise[1], torch.arange(n) % 3


def test_kcl_trains_in_a_ten_line_loop_with_a_users_encoder():
    torch.manual_seed(0)
    model = KCL(user_encoder(), dim=8, k=2, temperature=0.2, queue_size=32, bn_splits=2)
    optimizer = torch.optim.SGD(model.query_encoder.parameters(), lr=0.1, momentum=0.9)
    start = copy.deepcopy(model.state_dict())
    losses = []
    for step in range(6):
        view_q, view_k, labels = views(step)
        loss = model(view_q, view_k, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(torch.isfinite(torch.tensor(losses)))
    state = model.state_dict()
    assert len(model.bank) == 32 and (model.bank.labels >= 0).all()  # 6 x 8 keys went in
    assert int(model.bank.total_enqueued) == 48
    for name in ("query_encoder.5.weight", "key_encoder.5.weight"):  # both encoders moved
        assert not torch.equal(state[name], start[name]), name
    assert all(not p.requires_grad for p in model.key_encoder.parameters())
    assert isinstance(model.query_encoder[1], kcl_ext.kcl.SplitBatchNorm2d)


@pytest.mark.parametrize("k", [2, 0, -1])  # KCL, MoCo, FCL
def test_the_loss_is_kpos_loss_on_unit_features_against_the_bank(k):
    torch.manual_seed(1)
    model = KCL(user_encoder(), dim=8, k=k, temperature=0.2, queue_size=16, momentum=0.5,
                shuffle_bn=False)
    for step in range(2):  # fill part of the bank
        model(*views(10 + step))
    view_q, view_k, labels = views(3)
    bank_keys, bank_labels = model.bank.keys.clone(), model.bank.labels.clone()
    expected_key_encoder = copy.deepcopy(model.key_encoder)
    with torch.no_grad():  # the momentum update happens before the keys are encoded
        for key, query in zip(expected_key_encoder.parameters(),
                              model.query_encoder.parameters()):
            key.mul_(0.5).add_(query, alpha=0.5)
    query = F.normalize(model.query_encoder(view_q), dim=1)
    with torch.no_grad():
        keys = F.normalize(expected_key_encoder(view_k), dim=1)
    reference = kcl_ext.kpos_loss_reference(query, keys, bank_keys, labels, bank_labels, k=k,
                                            temperature=0.2, seed=5)
    loss = model(view_q, view_k, labels, seed=5)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    loss.backward()  # the bank written after the loss does not disturb its backward
    # 2 x 8 keys filled the bank of 16; these 8 replaced the oldest ones, in slots 0..7.
    torch.testing.assert_close(model.bank.keys[:8], keys)
    assert torch.equal(model.bank.labels[:8], labels)
    assert torch.equal(model.bank.keys[8:], bank_keys[8:])


def test_eval_mode_computes_a_loss_without_touching_the_model():
    model = KCL(user_encoder(), dim=8, queue_size=16)
    model(*views(0))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        loss = model(*views(1), seed=0)
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="KCL: momentum must be in \\[0, 1\\], got 1.5"):
        KCL(user_encoder(), dim=8, momentum=1.5)
    with pytest.raises(ValueError, match="KCL: k must be >= -1"):
        KCL(user_encoder(), dim=8, k=-2)
    with pytest.raises(TypeError, match="KCL: encoder must be an nn.Module"):
        KCL(lambda x: x, dim=8)
    with pytest.raises(ValueError, match="KCL: temperature must be a positive finite float, got 0.0"):
        KCL(user_encoder(), dim=8, temperature=0.0)
    with pytest.raises(ValueError, match="KCL: backend must be one of .*got 'tpu'"):
        KCL(user_encoder(), dim=8, backend="tpu")
    model = KCL(user_encoder(), dim=8, queue_size=16)
    view_q, view_k, labels = views(0)
    with pytest.raises(ValueError, match=r"labels must be \[N\] with N = view_q.size\(0\) = 8, "
                                         r"got \[7\]"):
        model(view_q, view_k, labels[:7])


def test_a_learnable_temperature_is_a_parameter_of_the_module_and_gets_a_gradient():
    torch.manual_seed(2)
    model = KCL(user_encoder(), dim=8, k=2, temperature=nn.Parameter(torch.tensor(0.2)),
                queue_size=16)
    assert any(p is model.temperature for p in model.parameters())
    model(*views(0))  # fills part of the bank
    loss = model(*views(1), seed=0)
    loss.backward()
    assert model.temperature.grad is not None and torch.isfinite(model.temperature.grad)
    assert model.temperature.grad.abs() > 0


def test_the_package_is_the_loss_and_what_it_needs_at_run_time():
    """No training recipe, study or console script in what `pip install` installs."""
    from setuptools import find_packages
    packages = find_packages(ROOT, include=["kcl_ext", "kcl_ext.*"])
    assert sorted(packages) == ["kcl_ext", "kcl_ext.triton"]
    assert not os.path.exists(os.path.join(ROOT, "kcl_ext", "training"))
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert not re.search(r"^\[project\.scripts\]", f.read(), re.M)
    assert {"KCL", "MemoryBank", "kpos_loss", "kpos_loss_reference"} <= set(kcl_ext.__all__)
