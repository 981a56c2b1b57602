"""Split-BN and the one-process shuffle of the key batch (kcl_ext.KCL) on the recipe's encoder."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _harness import RECIPE  # noqa: F401  (the recipe on sys.path)

from kcl_ext import KCL
from kcl_ext.kcl import SplitBatchNorm2d, batch_norm_groups, use_split_batch_norm
from models import ContrastiveEncoder, SmallResNet


def test_split_batch_norm_is_batch_norm_per_contiguous_group():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    split = SplitBatchNorm2d(3, splits=2)
    split.load_state_dict(plain.state_dict())
    out = split(x)
    groups = [nn.BatchNorm2d(3) for _ in range(2)]
    expected = []
    for g, chunk in zip(groups, x.chunk(2)):
        g.load_state_dict(plain.state_dict())
        expected.append(g(chunk))
    assert torch.allclose(out, torch.cat(expected), atol=1e-6)
    assert not torch.allclose(out, plain(x), atol=1e-3)  # not the whole batch's statistics
    # Running statistics: the mean of what each group's BN would hold.
    assert torch.allclose(split.running_mean, (groups[0].running_mean + groups[1].running_mean) / 2)
    assert torch.allclose(split.running_var, (groups[0].running_var + groups[1].running_var) / 2)
    assert int(split.num_batches_tracked) == 1
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.equal(split(x), plain(x))  # eval: plain BN with the running statistics
    split.train()
    with pytest.raises(ValueError, match="a batch of 7 images does not split into 2"):
        split(x[:7])


def test_use_split_batch_norm_keeps_the_state_dict():
    net = SmallResNet(1, width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    use_split_batch_norm(net, 4)
    assert batch_norm_groups(net) == 4
    assert all(type(m) is not nn.BatchNorm2d for m in net.modules())
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_one_process_shuffle_encodes_keys_with_another_groups_statistics():
    torch.manual_seed(0)
    pair = KCL(ContrastiveEncoder(SmallResNet(1, width=4), 8), 8, momentum=0.9, shuffle_bn=True,
               bn_splits=2, queue_size=8)
    images = torch.randn(6, 1, 12, 12)
    keys = pair.encode_keys(images, torch.Generator().manual_seed(7))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(7))
    reference = KCL(ContrastiveEncoder(SmallResNet(1, width=4), 8), 8, momentum=0.9, queue_size=8)
    reference.key_encoder.load_state_dict(pair.key_encoder.state_dict())
    with torch.no_grad():  # group g = chunk g of the permuted batch, with plain BN each
        encoded = F.normalize(torch.cat([reference.key_encoder(c) for c in images[perm].chunk(2)]))
        unshuffled = F.normalize(pair.key_encoder(images))
    expected = torch.empty_like(encoded)
    expected[perm] = encoded
    assert torch.allclose(keys, expected, atol=1e-6)
    assert not torch.allclose(keys, unshuffled, atol=1e-3)
    no_shuffle = KCL(ContrastiveEncoder(SmallResNet(1, width=4), 8), 8, momentum=0.9,
                     shuffle_bn=True, queue_size=8)
    no_shuffle.key_encoder.load_state_dict(pair.key_encoder.state_dict())
    with torch.no_grad():  # one group: nothing to shuffle with
        assert torch.equal(no_shuffle.encode_keys(images, torch.Generator()),
                           F.normalize(no_shuffle.key_encoder(images)))
