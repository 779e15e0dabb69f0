"""Keyed, counter-based random numbers for the FractalGen samplers.

Every random number a sampler draws is a pure function of its *key* — (seed, image index, path of
the patch in the tree, level, purpose, step, element) — and of nothing else: not of the order in
which numbers are drawn, nor of how images and patches are laid out in a batch. A depth-first
sampler that visits one patch at a time and a block sampler that runs every patch of a parent
iteration in one call therefore draw the same numbers, and one seed gives the same image.

The generator is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the generator of cuRAND and Random123), written in int64 tensor ops that never overflow
(32-bit words, products split into 16-bit halves), so CPU and CUDA give the same bits, nothing
syncs with the host and the ops can be captured in a CUDA graph.

Key layout (one Philox call gives 4 words; element ``e`` is word ``e % 4`` of block ``e // 4``):

==========  ==========================================================================
counter[0]  image index in the batch the user asked for (``< 2**32``)
counter[1]  path: 0 at the top; a child made from token ``t`` of a node with path ``p`` on a
            level of ``L`` tokens has path ``p * L + t`` (unique per level, ``< 2**32``)
counter[2]  ``level << 24 | purpose << 16 | step``: the level of the node (the final pixel head
            is level ``num_levels``), what the number is for (``ORDER``, ``GUIDE``, ``PIXEL``) and
            a step within that purpose (0 for all of FractalGen's draws)
counter[3]  ``element // 4``
key         the seed's low and high 32 bits
==========  ==========================================================================

The iteration that predicts a patch is not part of its key: the path determines it, and keeping it
out makes a patch's numbers independent of the iteration count too. The random order of a MAR node
is the argsort of 63-bit keyed integers (two words per token); its categorical draws (guiding pixel,
pixel head) are Gumbel-max over the 3 x 256 logits of R, G, B (elements ``256 * channel + value``).
"""

from __future__ import annotations

import numbers

import torch

M32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox-4x32 multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10

# Purposes (counter[2] bits 16-23).
ORDER = 1  # a MAR node's random generation order
GUIDE = 2  # a MAR node's guiding pixel (R, G, B)
PIXEL = 3  # a pixel's R, G, B

VALUES = 256  # categories per colour channel
CHANNELS = 3


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The 64-bit product of the 32-bit words a and m as (high, low) words, without an int64
    # overflow (signed overflow is undefined in the C++ kernels): a * (m >> 16) and a * (m & 0xFFFF)
    # are < 2**48, and the sum below < 2**49.
    x = a * (m >> 16)
    y = a * (m & 0xFFFF)
    z = ((x & 0xFFFF) << 16) + y
    return (x >> 16) + (z >> 32), z & M32


def philox4x32(counter: torch.Tensor, seed: int | torch.Tensor, rounds: int = ROUNDS) -> torch.Tensor:
    """Philox-4x32-``rounds`` of ``counter`` under the 64-bit key ``seed``.

    Args:
        counter: int64 ``(..., 4)``, each word in ``[0, 2**32)``.
        seed: int in ``[0, 2**64)``: key words ``seed & 0xFFFFFFFF`` and ``seed >> 32``; or those two
            words as an int64 tensor ``(2,)`` on the counter's device (``seed_words``), the same bits,
            read on the device (a CUDA graph can take the seed as an input).

    Returns:
        int64 ``(..., 4)``, words in ``[0, 2**32)``; equal to Random123's ``philox4x32_R``.

    Raises:
        ValueError: for a seed outside ``[0, 2**64)``, a seed tensor that is not int64 ``(2,)``, or a
            counter that is not int64 ``(..., 4)``.
    """
    if counter.dtype != torch.int64 or counter.shape[-1:] != (4,):
        raise ValueError(f"counter must be int64 (..., 4), got {counter.dtype} {tuple(counter.shape)}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (2,):
            raise ValueError(f"a seed tensor must be int64 (2,) (seed_words), got {seed.dtype} {tuple(seed.shape)}")
        # Every round's key words at once (round r: k + r * W mod 2**32), then 0-d views of them.
        r = torch.arange(rounds, dtype=torch.int64, device=seed.device)
        keys = list(zip(((seed[0] + r * PHILOX_W[0]) & M32).unbind(), ((seed[1] + r * PHILOX_W[1]) & M32).unbind()))
    else:
        seed = _check_seed(seed)
        k0, k1 = seed & M32, seed >> 32
        keys = [((k0 + r * PHILOX_W[0]) & M32, (k1 + r * PHILOX_W[1]) & M32) for r in range(rounds)]
    c0, c1, c2, c3 = counter.unbind(-1)
    for k0, k1 in keys:
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _check_seed(seed) -> int:
    # Python or NumPy integers; a Python int out (a NumPy int32 seed would overflow the key arithmetic)
    return _integer("seed", seed, 0, 2 ** 64)


def _integer(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value < high:
        bound = {2 ** 64: "2**64", 2 ** 32: "2**32"}.get(high, high)
        raise ValueError(f"{name} must be an integer in [{low}, {bound}), got {value!r}")
    return int(value)


def seed_words(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The key words ``(seed & 0xFFFFFFFF, seed >> 32)`` of ``seed`` as an int64 tensor ``(2,)`` on
    ``device``: what every function here takes in place of the int seed."""
    seed = _check_seed(seed)
    return torch.tensor([seed & M32, seed >> 32], dtype=torch.int64, device=device)


def purpose_word(level: int, purpose: int, step: int = 0) -> int:
    """``counter[2]``: ``level << 24 | purpose << 16 | step``.

    Raises:
        ValueError: for a level outside [0, 256), a purpose outside [0, 256) or a step outside [0, 65536).
    """
    level, purpose, step = (_integer(name, value, 0, bound) for name, value, bound in
                            (("level", level, 256), ("purpose", purpose, 256), ("step", step, 65536)))
    return level << 24 | purpose << 16 | step


def random_bits(seed: int | torch.Tensor, image: torch.Tensor, path: torch.Tensor, *, level: int, purpose: int,
                count: int, step: int = 0) -> torch.Tensor:
    """Keyed 32-bit random words, elements ``0 .. count-1`` of each key.

    Args:
        seed: the sampling seed, in ``[0, 2**64)``.
        image: int64, image index of each key (broadcasts with ``path``).
        path: int64, path of the node in the tree (see the module docstring).
        level, purpose, step: the rest of the key (``purpose_word``).
        count: elements per key.

    Returns:
        int64 ``broadcast(image, path).shape + (count,)``, words in ``[0, 2**32)``. Element ``e`` of a
        key is the same whatever ``count`` is (as long as ``count > e``) and whatever else is drawn
        with it.

    Raises:
        ValueError: for a count below 1; image or path not an integer tensor, or (checked on a CPU, where
            it costs no host sync) with values outside ``[0, 2**32)``; and as ``purpose_word`` and
            ``philox4x32``.
    """
    return _keyed(seed, image, path, level, purpose, step, count, torch.int64, lambda bits: bits)


# Philox blocks per pass on a CPU. Philox is ~220 int64 elementwise ops per block; over arrays larger than
# the cache each op streams from memory (a block sampler's draw for a batch of 64 images: 25 MB per array):
# the Gumbel noise of 16,384 pixels took 1.37 s in one pass, 0.50 s in passes of 2**15 blocks (256 KiB per
# array) on this project's 2-core CPU. A GPU draws in one pass (one set of kernels, capturable in a graph).
CPU_BLOCKS_PER_PASS = 1 << 15


def _keyed(seed, image, path, level: int, purpose: int, step: int, count: int, dtype: torch.dtype, convert):
    # convert(bits) of the keyed words (random_bits), in passes of whole keys on a CPU: convert is
    # elementwise, so a key's values do not depend on the pass it falls in.
    count = _integer("count", count, 1, 2 ** 34)  # 2**32 blocks of 4 words: counter[3] is 32 bits
    word = purpose_word(level, purpose, step)
    image, path = _key_words(image), _key_words(path, "path")
    image, path = torch.broadcast_tensors(image, path)
    shape, image, path = image.shape + (count,), image.reshape(-1), path.reshape(-1)
    blocks, keys = -(-count // 4), image.shape[0]
    per_pass = keys if path.device.type != "cpu" else max(1, CPU_BLOCKS_PER_PASS // blocks)
    if per_pass >= keys:
        return convert(_philox_words(seed, image, path, word, blocks)[:, :count]).view(shape)
    out = torch.empty(keys, count, dtype=dtype, device=path.device)
    for i in range(0, keys, per_pass):
        j = min(i + per_pass, keys)
        out[i:j] = convert(_philox_words(seed, image[i:j], path[i:j], word, blocks)[:, :count])
    return out.view(shape)


def _key_words(x, name: str = "image") -> torch.Tensor:
    # image / path: integer tensors of 32-bit words, as int64 (counter words). Checked where it costs no host
    # sync (a CPU tensor); on a GPU the samplers' own indices are in range by construction.
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = x.long()
    if x.device.type == "cpu" and x.numel() and not (0 <= int(x.min()) and int(x.max()) <= M32):
        raise ValueError(f"{name} values must be in [0, 2**32), got {int(x.min())} .. {int(x.max())}")
    return x


def _philox_words(seed, image: torch.Tensor, path: torch.Tensor, word: int, blocks: int) -> torch.Tensor:
    # (K, 4 blocks) words of K keys: counters (image, path, word, block) for blocks 0 .. blocks-1
    shape = (image.shape[0], blocks)
    counter = torch.stack((image.unsqueeze(-1).expand(shape), path.unsqueeze(-1).expand(shape),
                           torch.full(shape, word, dtype=torch.int64, device=path.device),
                           torch.arange(blocks, device=path.device).expand(shape)), dim=-1)
    return philox4x32(counter, seed).flatten(-2)


def uniform(seed: int | torch.Tensor, image: torch.Tensor, path: torch.Tensor, *, level: int, purpose: int, count: int,
            step: int = 0) -> torch.Tensor:
    """Keyed uniforms in ``[0, 1)``: the top 24 bits of ``random_bits`` times ``2**-24`` (float32,
    exact, so every device gives the same values). Shape as ``random_bits``."""
    return _keyed(seed, image, path, level, purpose, step, count, torch.float32,
                  lambda bits: (bits >> 8).to(torch.float32) * 2.0 ** -24)


def gumbel(seed: int | torch.Tensor, image: torch.Tensor, path: torch.Tensor, *, level: int, purpose: int, count: int,
           step: int = 0) -> torch.Tensor:
    """Keyed standard Gumbel noise ``-log(-log(u))``, ``u = (top 24 bits + 1/2) * 2**-24`` in (0, 1),
    float32, shape as ``random_bits``.

    The logarithms are taken in float64 and rounded to float32: float32 ``log`` may differ by an ulp
    between vectorised and scalar code paths (contiguous or strided tensors) and between devices,
    float64's error does not survive the rounding (except with probability about 2**-28 per value).
    """
    return _keyed(seed, image, path, level, purpose, step, count, torch.float32, _gumbel)


def _gumbel(bits: torch.Tensor) -> torch.Tensor:
    u = ((bits >> 8).to(torch.float64) + 0.5) * 2.0 ** -24
    return (-torch.log(-torch.log(u))).to(torch.float32)


def permutation(seed: int | torch.Tensor, image: torch.Tensor, path: torch.Tensor, *, level: int,
                length: int) -> torch.Tensor:
    """A MAR node's random generation order: ``argsort`` of 63-bit keyed integers (purpose ``ORDER``,
    two words per token, stable so that a tie, about 2**-47 likely, still has one answer).

    Returns:
        int64 ``broadcast(image, path).shape + (length,)``: a permutation of ``0 .. length-1``.
    """
    length = _integer("length", length, 1, 2 ** 33)
    bits = random_bits(seed, image, path, level=level, purpose=ORDER, count=2 * length)
    bits = bits.unflatten(-1, (length, 2))
    keys = ((bits[..., 0] & 0x7FFFFFFF) << 32) | bits[..., 1]
    return torch.argsort(keys, dim=-1, stable=True)


def channel_gumbel(seed: int | torch.Tensor, image: torch.Tensor, path: torch.Tensor, *, level: int,
                   purpose: int) -> torch.Tensor:
    """The Gumbel noise of one pixel draw (a guiding pixel or a pixel): ``(..., 3, 256)`` float32, for
    R, G, B; element ``256 * channel + value`` of the key."""
    noise = gumbel(seed, image, path, level=level, purpose=purpose, count=CHANNELS * VALUES)
    return noise.unflatten(-1, (CHANNELS, VALUES))


def guided_logits(logits: torch.Tensor, uncond_logits: torch.Tensor | None = None, *, cfg: float | torch.Tensor = 1.0,
                  temperature: float = 1.0, filter_threshold: float = 1e-4) -> torch.Tensor:
    """The logits a pixel value is drawn from, as the official ``PixelLoss.sample`` forms them.

    Temperature *multiplies* both logits. With classifier-free guidance (``uncond_logits`` given),
    values whose conditional probability is below ``filter_threshold`` get their unconditional logit
    raised to at least the conditional one shifted to the unconditional maximum (so guidance cannot
    promote what the conditional model rules out), then ``uncond + cfg * (cond - uncond)``.

    Args:
        logits: ``(..., 256)`` conditional logits (any float dtype; computed in float32).
        uncond_logits: ``(..., 256)`` unconditional logits, or None for no guidance.
        cfg: guidance scale; a tensor must hold ``float32(cfg)`` (a Python float is rounded to
            float32 by the multiplication, so both give the same bits).
        temperature: multiplies the logits (official semantics: above 1 sharpens).
        filter_threshold: conditional probability below which guidance is held back (official 1e-4).

    Returns:
        float32 ``(..., 256)``.
    """
    logits = logits.float() * temperature
    if uncond_logits is None:
        return logits
    uncond = uncond_logits.float() * temperature
    low = torch.softmax(logits, dim=-1) < filter_threshold
    shifted = logits - logits.amax(dim=-1, keepdim=True) + uncond.amax(dim=-1, keepdim=True)
    uncond = torch.where(low, torch.maximum(uncond, shifted), uncond)
    return uncond + cfg * (logits - uncond)


def sample_categorical(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-max: ``argmax(logits + noise)`` over the last dim (a draw from ``softmax(logits)`` when
    ``noise`` is standard Gumbel). int64, ``logits.shape[:-1]``."""
    return torch.argmax(logits + noise, dim=-1)
