"""``fastgen fractal``: a grid of sampled images written as a PNG; one-line errors, exit status 2."""

from __future__ import annotations

import re

import pytest
import torch

from fastgen.cli import main
from fastgen.fractal import image_grid
from fractal_models import single_thread  # noqa: F401 (an autouse fixture: one thread)


def test_fractal_writes_a_png_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["fractal", "--labels", "3,1,4", "--seed", "2", "--out", str(out), "--scale", "2", "--quiet",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert "wrote" in line and "3 images of 16x16" in line and "digits model" in line
    with Image.open(out) as png:  # 3 images, 2 a row (about square), 32 px each, 2 px apart
        assert png.size == (2 * (32 + 2) + 2, 2 * (32 + 2) + 2) and png.mode == "RGB"


def _status(argv) -> int:
    # argparse's own checks exit (SystemExit), the later ones return the status
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv,message", [
    (["--labels", "3,12"], r"class labels must be in \[0, 10\)"),
    (["--labels", "a,b"], "comma-separated integers"),
    (["--cfg", "0.5"], "cfg must be >= 1"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--preset", "fractalmar_giant"], "unknown FractalGen preset"),
    (["--preset", "fractalmar_in64", "--weights", "/nonexistent.pt"], "no such file"),
    (["--sampler", "fast"], "unknown sampler 'fast'"),
], ids=["label", "labels", "cfg", "temperature", "preset", "weights", "sampler"])
def test_fractal_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert _status(["fractal", "--out", str(tmp_path / "x.png"), "--quiet", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert err.startswith("fastgen fractal: error: ")
    assert not (tmp_path / "x.png").exists()


def test_fractal_wrong_state_dict_layout(tmp_path, capsys):
    path = tmp_path / "wrong.pt"
    torch.save({"model": {"class_emb.weight": torch.zeros(3, 3)}}, path)
    assert _status(["fractal", "--preset", "fractalmar_in64", "--weights", str(path), "--out",
                    str(tmp_path / "x.png"), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match this FractalGen's layout" in err and "missing keys" in err


def test_image_grid():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2)
    grid = image_grid(images, nrow=2, scale=3, pad=1)
    assert grid.shape == (3, 3 * 7 + 1, 2 * 7 + 1)
    assert torch.equal(grid[:, 1 + 7:1 + 7 + 6:3, 1 + 7:1 + 7 + 6:3], images[3])  # row 1, column 1
    assert not grid[:, :, 0].any() and not grid[:, 15:, 8:].any()  # padding, the empty sixth cell
    with pytest.raises(ValueError, match="uint8"):
        image_grid(images.float())
