"""Train the tiny digits FractalGen (``fastgen.fractal.digits.DIGITS_CONFIG``) and its judge, a small
classifier, on 8 x 8 digits drawn from the fonts inside Pillow, upscaled to 16 x 16; write both weight
files (the generator's in float16) into ``src/fastgen/fractal/weights/``.

Why fonts: scikit-learn (whose ``load_digits`` the issue suggests) is not installed in this project's
environment; Pillow is (diffusers needs it) and ships a FreeType font (Aileron Regular, its
``load_default(size)``) and a bitmap font. The digits are rendered as scikit-learn's were made: a
32 x 32 binary bitmap of the glyph (random size, stroke width, rotation, shear, stretch, shift; fitted
in a 28 px box) counted in 4 x 4 blocks, giving 8 x 8 images with grey levels 0..16
(``render_digits``).

Training (the official FractalGen objective, teacher forced): the MAR level masks a random share
``cos(pi/2 u)`` of its 16 tokens in a random order (u uniform: the share the cosine sampling schedule
visits), and the features of up to ``--children`` masked tokens per image condition the AR level,
which reads each child's 4 x 4 patch pixel by pixel; the pixel head's cross-entropy over R, G, B of
every pixel is the loss. Labels are dropped to the unconditional ``fake_latent`` 10% of the time
(classifier-free guidance). AdamW, cosine learning rate, one thread.

    python tools/train_fractal_digits.py                      # ~9 minutes on one (shared) core
    python tools/train_fractal_digits.py --steps 50 --out /tmp/digits   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.fractal.digits import CLASSIFIER_FILE, DIGITS_CONFIG, GREY_LEVELS, MODEL_FILE, DigitClassifier
from fastgen.fractal.model import FractalGen, ids_to_values, patchify

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "fastgen" / "fractal" / "weights"


def render_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits (labels ``i % 10``): int64 grey ``(n, 8, 8)`` in 0..16 and labels ``(n,)``."""
    from PIL import Image, ImageDraw, ImageFont

    rs = np.random.default_rng(seed)
    fonts: dict[int, object] = {}
    bitmap = ImageFont.load_default_imagefont()
    out = np.zeros((n, 8, 8), np.int64)
    labels = np.arange(n) % 10
    for i, d in enumerate(labels):
        while True:
            if rs.random() < 0.2:  # the bitmap font, blown up
                small = Image.new("L", (16, 16), 0)
                ImageDraw.Draw(small).text((4, 2), str(d), fill=255, font=bitmap)
                big = small.resize((96, 96), Image.NEAREST)
            else:
                size = int(rs.integers(44, 64))
                if size not in fonts:
                    fonts[size] = ImageFont.load_default(size=size)
                big = Image.new("L", (96, 96), 0)
                ImageDraw.Draw(big).text((48, 48), str(d), fill=255, font=fonts[size], anchor="mm",
                                         stroke_width=int(rs.integers(0, 4)), stroke_fill=255)
            big = big.rotate(rs.uniform(-15, 15), resample=Image.BILINEAR, center=(48, 48))
            sx, sh = rs.uniform(0.75, 1.2), rs.uniform(-0.3, 0.3)
            big = big.transform((96, 96), Image.AFFINE, (sx, sh, 48 - 48 * (sx + sh), 0, 1, 0),
                                resample=Image.BILINEAR)
            a = np.asarray(big) > 100
            ys, xs = np.nonzero(a)
            if len(ys):
                break
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        h, w = y1 - y0, x1 - x0
        scale = 28 / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        glyph = Image.fromarray((a[y0:y1, x0:x1] * 255).astype(np.uint8)).resize((nw, nh), Image.BILINEAR)
        canvas = Image.new("L", (32, 32), 0)
        canvas.paste(glyph, ((32 - nw) // 2 + int(rs.integers(-2, 3)), (32 - nh) // 2 + int(rs.integers(-2, 3))))
        out[i] = (np.asarray(canvas) > 127).reshape(8, 4, 8, 4).sum((1, 3))
    return out, labels


def to_ids(grey8: np.ndarray) -> torch.Tensor:
    """8 x 8 grey levels 0..16 to 16 x 16 uint8-valued channel ids ``(n, 16, 16)`` int64 (2x nearest)."""
    x = torch.from_numpy(grey8)
    x = x.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.round(x.double() * 255 / GREY_LEVELS).long()


def loss_of(model: FractalGen, ids: torch.Tensor, labels: torch.Tensor, children: int, gen: torch.Generator):
    """The teacher-forced loss of one batch (module docstring). ``ids``: ``(B, 16, 16)`` grey ids."""
    b = ids.shape[0]
    rgb_ids = ids[:, None].expand(-1, 3, -1, -1)  # (B, 3, 16, 16): grey to RGB
    values = ids_to_values(rgb_ids.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # normalised (B, 3, 16, 16)
    top, low = model.levels
    conds = model.class_conditions(labels, guided=False)
    drop = torch.rand(b, generator=gen) < 0.1
    conds = torch.where(drop[:, None, None], model.fake_latent[:, None].expand_as(conds), conds)
    tokens = patchify(values, top.config.patch_size)  # (B, 16, 48)
    length = tokens.shape[1]
    rank = torch.argsort(torch.rand(b, length, generator=gen), dim=1).argsort(dim=1)  # position's rank in the order
    share = torch.cos(math.pi / 2 * torch.rand(b, generator=gen))
    n_masked = torch.clamp(torch.ceil(share * length), 1, length)
    masked = rank < n_masked[:, None]
    feats = top(tokens, masked, conds)  # (B, 16, 5, D)
    chosen = rank < torch.clamp(n_masked, max=children)[:, None]  # the first masked ones in the order
    child_conds = feats[chosen]  # (n, 5, D)
    patch = top.config.patch_size
    child_ids = patchify(rgb_ids.float(), patch).long()[chosen]  # (n, 3 p p)
    child_ids = child_ids.view(-1, 3, patch * patch).transpose(1, 2)  # (n, 16 pixels, 3)
    child_tokens = ids_to_values(child_ids)  # (n, 16, 3): AR tokens, raster pixels
    pix = low(child_tokens, child_conds)[:, :, 0]  # (n, 16, D1): pixel t's condition
    logits = model.pixel_head(pix.reshape(-1, pix.shape[-1]), child_ids.reshape(-1, 3))  # (n 16, 3, 256)
    return F.cross_entropy(logits.reshape(-1, 256), child_ids.reshape(-1))


def train_generator(ids, labels, *, steps, batch, lr, children, seed, log_every=50) -> FractalGen:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FractalGen(DIGITS_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    n = ids.shape[0]
    t0 = time.perf_counter()
    running = None
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(0, n, (batch,), generator=gen)
        loss = loss_of(model, ids[pick], labels[pick], children, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"generator step {step + 1}/{steps}: loss {running:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return model.eval()


def train_classifier(ids, labels, *, steps, batch, seed) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    x = ids.float()[:, None] / 255
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(clf(x[pick]), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20000, help="digits rendered for training (default 20000)")
    p.add_argument("--steps", type=int, default=2500, help="generator steps (default 2500)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--children", type=int, default=4, help="masked tokens per image the lower level learns from")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(WEIGHTS), help=f"folder for {MODEL_FILE} and {CLASSIFIER_FILE}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    grey, labels = render_digits(args.samples, args.seed)
    held, held_labels = render_digits(2000, args.seed + 1)
    ids, labels = to_ids(grey), torch.from_numpy(labels)
    print(f"rendered {args.samples} + 2000 held-out digits in {time.perf_counter() - t0:.0f} s", flush=True)
    clf = train_classifier(ids, labels, steps=args.classifier_steps, batch=128, seed=args.seed)
    with torch.no_grad():
        acc = (clf(to_ids(held).float()[:, None] / 255).argmax(-1) == torch.from_numpy(held_labels)).float().mean()
    print(f"classifier: held-out accuracy {acc.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = train_generator(ids, labels, steps=args.steps, batch=args.batch, lr=args.lr, children=args.children,
                            seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out / MODEL_FILE)
    torch.save({k: v.half() for k, v in clf.state_dict().items()}, out / CLASSIFIER_FILE)
    sizes = ", ".join(f"{f}: {(out / f).stat().st_size / 1e6:.2f} MB" for f in (MODEL_FILE, CLASSIFIER_FILE))
    print(f"wrote {out} ({sizes}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
