"""The tiny trained FractalGen (fastgen.fractal.digits, weights shipped): both samplers draw recognisable
digits of the labels asked for, judged by the classifier trained on the same data (an end-to-end check:
random weights or noise score at chance)."""

from __future__ import annotations

import pytest
import torch

from fastgen.fractal import FractalGen, sample
from fastgen.fractal.digits import (DIGITS_CONFIG, DIGITS_SAMPLING, classify, load_digits_classifier,
                                    load_digits_model)
from fractal_models import single_thread  # noqa: F401 (an autouse fixture: one thread)

LABELS = [d for d in range(10) for _ in range(3)]  # 30 images, 3 of each digit


@pytest.fixture(scope="module")
def judged():
    return load_digits_model(), load_digits_classifier()


def accuracy(classifier, images) -> float:
    return float((classify(classifier, images) == torch.tensor(LABELS)).float().mean())


def test_both_samplers_draw_recognisable_digits(judged):
    model, classifier = judged
    kw = dict(DIGITS_SAMPLING, seed=0, progress=False)
    block = sample(model, LABELS, sampler="block", **kw)
    reference = sample(model, LABELS, sampler="reference", **kw)
    assert torch.equal(block, reference)  # one seed, one image (float32, CPU)
    assert accuracy(classifier, block) >= 0.7  # chance: 0.1
    assert torch.equal(block[:, 0], block[:, 1]) and torch.equal(block[:, 0], block[:, 2])  # grey, as trained
    assert not torch.equal(block[0], block[1])  # three different 0s


def test_untrained_model_scores_near_chance(judged):
    # The judge is not fooled by what any model draws: the initial weights' samples are noise.
    _, classifier = judged
    torch.manual_seed(0)
    images = sample(FractalGen(DIGITS_CONFIG), LABELS, sampler="block", seed=0, progress=False, **DIGITS_SAMPLING)
    assert accuracy(classifier, images) <= 0.3


def test_classifier_and_weights_are_small():
    from importlib import resources

    folder = resources.files("fastgen.fractal") / "weights"
    sizes = {name: len((folder / name).read_bytes()) for name in ("digits.pt", "digits_classifier.pt")}
    assert all(0 < size < 5e6 for size in sizes.values()), sizes  # the issue: committed weights under 5 MB
    assert sum(p.numel() for p in load_digits_classifier().parameters()) < 50_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 CUDA-graph path needs a CUDA GPU")
def test_block_sampler_in_bf16_on_a_gpu_draws_recognisable_digits(judged):
    _, classifier = judged
    model = load_digits_model(dtype=torch.bfloat16).cuda()
    images = sample(model, LABELS, sampler="block", seed=0, progress=False, **DIGITS_SAMPLING)
    assert images.is_cuda and accuracy(classifier, images) >= 0.7
