"""The public names of relabel_dali resolve to real objects (they are imported lazily)."""
import pytest

import relabel_dali


@pytest.mark.parametrize("name", relabel_dali.__all__)
def test_export_resolves(name):
    assert getattr(relabel_dali, name) is not None


def test_unknown_name():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        relabel_dali.nope
