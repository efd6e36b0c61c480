"""quantsd.instance_forward: a forward set on one instance wraps what the instance had, keeps
nn.Module.__call__'s fast path (no hooks), and puts back what it wrapped when removed."""

import copy

import torch
from torch import nn

from quantsd.instance_forward import InstanceForward


class Doubling(InstanceForward):
    def __call__(self, *args, **kwargs):
        return 2 * self.call_inner(*args, **kwargs)


class Other(InstanceForward):
    pass


def test_install_wraps_the_class_forward_and_remove_restores_it():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    want = lin(x)
    w = Doubling.install(lin)
    assert lin.forward is w and w.inner is None and Doubling.installed(lin) is w
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    torch.testing.assert_close(lin(x), 2 * want)
    assert Other.installed(lin) is None and Other.remove(lin) is False     # another kind is left alone
    assert lin.forward is w
    assert Doubling.remove(lin) is True and "forward" not in lin.__dict__
    torch.testing.assert_close(lin(x), want)
    assert Doubling.remove(lin) is False


def test_a_forward_already_on_the_instance_is_kept_inside_and_comes_back():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    own = lambda t: t.sum(-1, keepdim=True)  # noqa: E731
    lin.forward = own
    outer = Doubling.install(lin)
    assert outer.inner is own
    torch.testing.assert_close(lin(x), 2 * x.sum(-1, keepdim=True))
    stacked = Doubling.install(lin)       # a second one wraps the first: remove takes off the outermost
    torch.testing.assert_close(lin(x), 4 * x.sum(-1, keepdim=True))
    assert stacked.inner is outer
    Doubling.remove(lin)
    Doubling.remove(lin)
    assert lin.forward is own


def test_a_deep_copy_gets_its_own_wrapper_on_its_own_module():
    lin = nn.Linear(3, 2)
    Doubling.install(lin)
    twin = copy.deepcopy(lin)
    assert twin.forward is not lin.forward and twin.forward.module is twin
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.fill_(1.0)
    torch.testing.assert_close(twin(torch.randn(1, 3)), torch.full((1, 2), 2.0))
