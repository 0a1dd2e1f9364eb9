"""The memory estimate's model count: a deep net counted from its shallow relatives equals the
count of its own forward on the meta device (bnlib.memory._model_size)."""
import pytest

from bnlib import memory
from bnlib.models import arch_spec


@pytest.mark.parametrize("arch,stem,shortcut", [("wrn100_1", "imagenet", "B"), ("resnet110", "cifar", "A"),
                                                ("resnet101", "cifar", "B"), ("resnet152", "cifar", "B")])
def test_a_deep_net_counted_from_shallow_ones_is_exact(arch, stem, shortcut):
    assert sum(arch_spec(arch).layers) > memory.DIRECT_BLOCKS  # the extrapolated path
    memory._model_size.cache_clear()
    got = memory._model_size(arch, stem, shortcut)
    assert got == memory._count({**memory.PLAIN_NET, "stem": stem, "shortcut": shortcut, "arch": arch_spec(arch)})
    assert got[0] > 0 and got[1] > 0


def test_a_shallow_net_is_counted_directly():
    assert sum(arch_spec("resnet18").layers) <= memory.DIRECT_BLOCKS
    params, acts = memory._model_size("resnet18", "cifar", "B")
    assert 11_000_000 < params < 11_300_000  # torchvision's ResNet-18 on 10 classes: 11.17 M
