"""``fastgen fractal``: a grid of sampled images written as a PNG; one-line errors, exit status 2."""

from __future__ import annotations

import re

import numpy as np
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


def test_fractal_takes_iterations_per_level(tmp_path, capsys):
    from fastgen.fractal import sample
    from fastgen.fractal.digits import DIGITS_SAMPLING, load_digits_model

    out = tmp_path / "grid.png"
    assert main(["fractal", "--labels", "7", "--num-iter", "3,16", "--out", str(out), "--scale", "1", "--quiet",
                 "--device", "cpu"]) == 0
    want = sample(load_digits_model(), [7], num_iter=(3, 16), progress=False, **DIGITS_SAMPLING)[0]  # seed 0: the default
    from PIL import Image

    with Image.open(out) as png:
        grid = torch.from_numpy(np.array(png)).permute(2, 0, 1)
    assert torch.equal(grid[:, 2:18, 2:18], want)  # the one image, 2 px from the grid's edge


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
    (["--labels", "1,,2"], "none empty, got '1,,2'"),
    (["--labels", "1,2,"], "none empty"),
    (["--device", "cpu:1"], "--device cpu:1: there is one CPU device"),
    (["--device", "cuda:99"], r"--device cuda:99(: this machine has \d+ CUDA| asked for, but .* sees no CUDA)"),
    (["--out", "noext"], "argument --out: 'noext' needs an image extension Pillow writes"),
    (["--out", "grid.notaformat"], r"\(\.notaformat is not one\)"),
    (["--out", "{tmp}/x.png/grid.png"], "cannot create its folder, .*x.png is a file"),
    (["--out", "{tmp}/folder.png"], "folder.png: a folder, not a file"),
    (["--out", "{tmp}/grid.xbm"], r"grid.xbm: cannot write it \(OSError: cannot write mode RGB as XBM\)"),
    (["--num-iter", "4,x"], "argument --num-iter: not an integer: 'x'"),
    (["--num-iter", "4,0"], "argument --num-iter: must be at least 1, got 0"),
    (["--num-iter", "4,4,4"], r"num_iter must be .* one int per level \(2\), got \(4, 4, 4\)"),
    (["--nrow", "two"], "argument --nrow: not an integer: 'two'"),
], ids=["label", "labels", "cfg", "temperature", "preset", "weights", "sampler", "empty-label", "trailing-comma",
        "cpu-index", "cuda-index", "out-no-extension", "out-unknown-extension", "out-folder-is-a-file",
        "out-is-a-folder", "out-format-without-rgb", "num-iter-word", "num-iter-zero", "num-iter-levels", "nrow"])
def test_fractal_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "x.png").write_bytes(b"")  # a file where --out {tmp}/x.png/grid.png wants a folder
    (tmp_path / "folder.png").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert _status(["fractal", "--out", str(tmp_path / "out.png"), "--quiet", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert err.startswith("fastgen fractal: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "x.png"]  # nothing written


def test_fractal_loads_weights_without_a_warning(tmp_path, capsys):
    # the layout check loads meta tensors into a meta model: no "copying from a non-meta parameter" warning
    # per tensor (filterwarnings = error makes any warning fail this test)
    from fastgen.fractal.digits import load_digits_model

    import argparse

    weights, out = tmp_path / "digits.pth", tmp_path / "sub" / "grid.jpg"
    # as the official util/misc.py save_model writes it: an argparse.Namespace beside the state dict
    torch.save({"model": load_digits_model().state_dict(), "args": argparse.Namespace(model="digits"), "epoch": 3},
               weights)
    assert main(["fractal", "--preset", "digits", "--weights", str(weights), "--labels", "7", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert f"from {weights}" in line and "1 image of 16x16" in line  # one image: no "1 images"
    from PIL import Image

    with Image.open(out) as image:  # a folder made for it; the extension picks the format
        assert image.format == "JPEG"


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
    assert image_grid(images, nrow=5, scale=1, pad=0).shape == (3, 2, 5 * 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(nrow=0), r"nrow must be an int >= 1 \(or None for the default\), got 0"),
    (dict(scale=0), r"scale must be an int >= 1 \(or None for the default\), got 0"),
    (dict(nrow=-1), "nrow must be an int >= 1"),
    (dict(nrow=2.5), "nrow must be an int >= 1"),
    (dict(nrow=True), "nrow must be an int >= 1"),
    (dict(scale=False), "scale must be an int >= 1"),
    (dict(pad=-1), "pad must be an int >= 0, got -1"),
    (dict(pad=None), "pad must be an int >= 0, got None"),
    (dict(images=torch.zeros(0, 3, 4, 4, dtype=torch.uint8)), r"at least one image .* got \(0, 3, 4, 4\)"),
    (dict(images=torch.zeros(2, 3, 0, 4, dtype=torch.uint8)), r"at least one image .* got \(2, 3, 0, 4\)"),
    (dict(images=[1, 2]), "images must be uint8 .* got list"),
], ids=["nrow-0", "scale-0", "nrow-negative", "nrow-float", "nrow-bool", "scale-bool", "pad-negative", "pad-none",
        "no-images", "no-pixels", "not-a-tensor"])
def test_image_grid_validates_its_arguments(kwargs, message):
    # the documented ValueError: never a silent default for 0, never a torch error from deep inside
    kwargs = dict(dict(images=torch.zeros(5, 3, 4, 4, dtype=torch.uint8)), **kwargs)
    with pytest.raises(ValueError, match=message):
        image_grid(**kwargs)
