"""Tiny FractalGen configs and random-weight models shared by the fractal tests (tests/test_fractal*.py)."""

from __future__ import annotations

import pytest
import torch

from fastgen.fractal import FractalConfig, FractalGen, LevelConfig, PixelHeadConfig


def tiny(kinds=("mar", "mar"), sizes=(8, 2, 1), *, guiding=False, num_conds=5, num_iter=4, widths=None,
         num_classes=10) -> FractalConfig:
    """Levels of ``kinds`` over ``sizes`` (image side, then each level's patch side), depth 1, 2 heads."""
    widths = widths or (16, 8, 8)[: len(kinds)]
    levels = tuple(LevelConfig(kind=kind, image_size=sizes[k], patch_size=sizes[k + 1], width=widths[k], depth=1,
                               heads=2, num_iter=num_iter, guiding_pixel=guiding and k > 0)
                   for k, kind in enumerate(kinds))
    head = PixelHeadConfig(width=8, depth=1, heads=2)
    return FractalConfig(levels=levels, pixel_head=head, num_classes=num_classes, num_conds=num_conds, guide_head=head)


def model_of(config: FractalConfig, seed: int = 0) -> FractalGen:
    """``config``'s model with random normal(0, 0.5) weights: well away from the initialisation, whose
    near-zero codebooks make every pixel distribution almost uniform (so that guidance or labels would
    barely change a draw)."""
    torch.manual_seed(seed)
    model = FractalGen(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for every test of a module that imports this fixture: tiny ops, where threads
    only add overhead on the 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
