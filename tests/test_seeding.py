"""The one seed derivation, pinned: partitions saved in checkpoints and the data order of a
resumed run depend on these exact numbers."""

import pytest

from mosa_scale.seeding import derive_seed


def test_both_streams_give_their_frozen_numbers():
    assert derive_seed("partition", 3407, "a.b.weight") == 776223936990784051
    assert derive_seed("route", 0, 1, 2, 3) == 8644307053989622243
    assert derive_seed("shards", 3407, 0, stream="data") == 14071694608916774793
    assert derive_seed("augment", 1, 2, 3, 4, 5, stream="data") == 3528254488120467165
    assert derive_seed("x", 1) != derive_seed("x", 2) != derive_seed("y", 1)
    with pytest.raises(ValueError, match="stream"):
        derive_seed("x", stream="other")  # type: ignore[arg-type]
