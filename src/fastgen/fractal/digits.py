"""A tiny trained FractalGen: class-conditional 16 x 16 digits, and a small classifier that judges them.

The data are 8 x 8 digits with 17 grey levels (0..16, as scikit-learn's ``load_digits``: a 32 x 32
binary bitmap counted in 4 x 4 blocks), drawn from the fonts that ship inside Pillow (its built-in
FreeType font, Aileron Regular, and its legacy bitmap font) under random size, stroke width,
rotation, shear, stretch and shift; upscaled 2x (nearest) to 16 x 16, grey ``v`` to
``round(v * 255 / 16)``, grey to RGB. ``tools/train_fractal_digits.py`` renders them and trains both
models; the weights ship as package data (``weights/digits.pt``, ``weights/digits_classifier.pt``).

- ``DIGITS_CONFIG``: 16 px, a MAR level of 16 tokens (4 x 4 patches) over an AR level of 16 pixels,
  then the pixel head; ``DIGITS_SAMPLING``: the settings the checks use.
- ``load_digits_model()``: the trained ``FractalGen``; ``load_digits_classifier()``: the classifier.
- ``classify(classifier, images)``: predicted digits of uint8 ``(B, 3, 16, 16)`` images.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.fractal.config import FractalConfig, LevelConfig, PixelHeadConfig

DIGITS_CONFIG = FractalConfig(
    levels=(LevelConfig(kind="mar", image_size=16, patch_size=4, width=96, depth=4, heads=4, num_iter=8),
            LevelConfig(kind="ar", image_size=4, patch_size=1, width=64, depth=2, heads=4, num_iter=16)),
    pixel_head=PixelHeadConfig(width=32, depth=1, heads=2),
    num_classes=10, num_conds=5)

# What the end-to-end checks sample with (tests/test_fractal_digits.py, ``fastgen fractal --preset digits``).
DIGITS_SAMPLING = {"cfg": 4.0, "temperature": 1.3}

MODEL_FILE = "digits.pt"
CLASSIFIER_FILE = "digits_classifier.pt"
GREY_LEVELS = 16  # the 8 x 8 data's grey values are 0..16


class DigitClassifier(nn.Module):
    """A small CNN over 16 x 16 grey images in [0, 1] ``(B, 1, 16, 16)``: 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def _weights(name: str, path=None) -> dict:
    if path is None:
        with resources.as_file(resources.files("fastgen.fractal") / "weights" / name) as p:
            return torch.load(p, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_digits_model(path=None, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The trained digits ``FractalGen`` (``DIGITS_CONFIG``; weights stored in float16, loaded as
    ``dtype``), from the package data or ``path``."""
    from fastgen.fractal.model import FractalGen

    model = FractalGen(DIGITS_CONFIG)
    state = {k: v.to(dtype) for k, v in _weights(MODEL_FILE, path).items()}
    model.load_state_dict(state)
    return model.to(dtype).eval()


def load_digits_classifier(path=None) -> DigitClassifier:
    """The digit classifier trained on the same data (float32, CPU), from the package data or ``path``."""
    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in _weights(CLASSIFIER_FILE, path).items()})
    return model.eval()


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, 16, 16)`` RGB (or ``(B, 16, 16)`` grey) images to the classifier's ``(B, 1, 16,
    16)`` float input in [0, 1] (the channels' mean)."""
    x = images.float() / 255
    return (x.mean(1) if x.dim() == 4 else x)[:, None]


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted digit ``(B,)`` int64 of uint8 images (``to_classifier_input``)."""
    return classifier(to_classifier_input(images.cpu())).argmax(-1)
