"""Token merging (ToMe): fastgen's reference matching equals tomesd 0.1.3's after unmerge, on odd grids,
with and without randomness; the paper's small example; ratio limits."""

import pytest
import torch

from fastgen.merging import ToDoConfig, ToMeConfig
from fastgen.merging.matching import bipartite_match, dst_grid, merge, unmerge

def test_four_by_four_grid_without_randomness():
    mask = dst_grid(4, 4, 2, 2, use_rand=False)
    assert mask.flatten().nonzero().flatten().tolist() == [0, 2, 8, 10]
    x = torch.randn(2, 16, 8)
    m = bipartite_match(x, 4, 4, 2, 2, r=int(16 * 0.5), use_rand=False)
    assert m.r == 8 and merge(x, m).shape == (2, 8, 8) and m.src_idx.numel() == 12


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (5, 4), (1, 6)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.74])
def test_unmerge_keeps_every_unmerged_token_exactly(h, w, ratio):
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(3, h * w, 16, generator=g)
    sy = 2 if h > 1 else 1
    m = bipartite_match(x, h, w, 2, sy, int(h * w * ratio), generator=torch.Generator().manual_seed(1))
    y = unmerge(merge(x, m), m)
    kept = m.src_idx[m.unmerged][..., None].expand(-1, -1, 16)  # (B, unmerged, C): grid positions
    assert torch.equal(y.gather(1, kept), x.gather(1, kept))
    if m.r == 0:
        assert torch.equal(y, x)  # ratio 0: nothing changes


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10), (7, 9), (9, 7)])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("use_rand", [False, True])
def test_equals_tomesd_after_unmerge(h, w, ratio, use_rand):
    from tomesd.merge import bipartite_soft_matching_random2d  # the [test] extra installs it

    g = torch.Generator().manual_seed(7 + h * w)
    x = torch.randn(2, h * w, 24, generator=g)
    r = int(h * w * ratio)
    t_merge, t_unmerge = bipartite_soft_matching_random2d(
        x, w, h, 2, 2, r, no_rand=not use_rand, generator=torch.Generator().manual_seed(3))
    m = bipartite_match(x, h, w, 2, 2, r, use_rand=use_rand, generator=torch.Generator().manual_seed(3))
    assert merge(x, m).shape == t_merge(x).shape
    torch.testing.assert_close(unmerge(merge(x, m), m), t_unmerge(t_merge(x)), rtol=0, atol=1e-6)


def test_configs_validate_like_the_issue_says():
    assert ToMeConfig(0.5).ratio == 0.5 and ToMeConfig(0.5).max_downsample is None
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ToMeConfig(1.0)
    with pytest.raises(ValueError, match="0.75"):
        ToMeConfig(0.8)  # sx = sy = 2: at most 3 of 4 tokens can go
    assert ToMeConfig(0.85, sx=4, sy=2).sx == 4
    with pytest.raises(ValueError, match="unknown ToMeConfig option"):
        ToMeConfig(0.5, foo=1)
    with pytest.raises(ValueError, match="method"):
        ToDoConfig(2, method="bilinear")
    with pytest.raises(ValueError, match="factor"):
        ToDoConfig(1)
