"""Flux token facts shared by conditions and editing: images to packed latent tokens, position
ids, and pixel masks to token masks.

Flux packs the VAE latent 2x2: an image of H x W pixels becomes (H/16) * (W/16) tokens of
4 * latent_channels features, token (r, c) at position id ``[0, r, c]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 2  # Flux packs 2x2 latent pixels into one token


def pixels_per_token(pipe) -> int:
    return pipe.vae_scale_factor * PATCH


def token_grid(pipe, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of tokens of a ``height`` x ``width`` image; both must be multiples of 16."""
    p = pixels_per_token(pipe)
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} must be a multiple of {p} pixels in both dimensions")
    return height // p, width // p


def grid_ids(rows: int, cols: int, *, scale: float = 1.0, delta: tuple[float, float] = (0.0, 0.0),
             device=None, dtype=torch.float32) -> torch.Tensor:
    """(rows * cols, 3) position ids ``[0, row, col]`` in row-major token order.

    ``scale`` > 1 places each token at the centre of the ``scale`` x ``scale`` cell it covers in a
    finer grid (a compact condition: row ``i`` -> ``i * scale + (scale - 1) / 2``); ``delta``
    (rows, cols) then shifts every token (OminiControl's ``position_delta``).
    """
    offset = (scale - 1.0) / 2.0
    r = torch.arange(rows, dtype=torch.float64) * scale + offset + delta[0]
    c = torch.arange(cols, dtype=torch.float64) * scale + offset + delta[1]
    ids = torch.zeros(rows, cols, 3, dtype=torch.float64)
    ids[..., 1] = r[:, None]
    ids[..., 2] = c[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def _check_values(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as a float image in [0, 1]: uint8 is read as 0-255 (as PIL images are), floats must
    already be in [0, 1]. diffusers' image processor would take values < 0 as [-1, 1] (deprecated)
    and anything above 1 silently, so a 0-255 float image would become a white one: refuse it."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a float image in [0, 1] or a uint8 image in [0, 255], got dtype {x.dtype}")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            hint = (" (0-255 values? divide by 255)" if hi > 1.0 else
                    " ([-1, 1] values? give (x + 1) / 2)" if lo < 0 else "")
            raise ValueError(f"{what} must have values in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
    return x


def image_tensor(pipe, image, what: str = "image") -> torch.Tensor:
    """Check ``image`` and bring it to (B, 3, H, W) in [-1, 1] through the pipeline's own image
    processor, without running any model: PIL (converted to RGB), array (H, W, 3) / (B, H, W, 3)
    or tensor (3, H, W) / (B, 3, H, W), float in [0, 1] or uint8; sides multiples of 16 px.
    Errors name ``what`` and the expected shape or range."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - diffusers depends on Pillow
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"{what} must be an RGB array (H, W, 3) or (B, H, W, 3), got shape {image.shape}")
        # channels first, as a tensor: one path for the range check and the processor
        image = torch.from_numpy(np.ascontiguousarray(image)).movedim(-1, -3)
    elif not isinstance(image, torch.Tensor):
        raise ValueError(f"{what} must be a PIL image, a numpy array (H, W, 3) or a tensor (3, H, W), "
                         f"got {type(image).__name__}")
    if isinstance(image, torch.Tensor):
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{what} must be an RGB tensor (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
        image = _check_values(image.detach(), what)
        h, w = image.shape[-2:]
    else:
        w, h = image.size
    p = pixels_per_token(pipe)
    if h % p or w % p:  # the image processor would silently crop: say so instead
        raise ValueError(f"{what} is {h}x{w} px: each side must be a multiple of {p} px")
    x = pipe.image_processor.preprocess(image)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels, got a tensor of shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def encode(pipe, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] (``image_tensor``) -> packed tokens (B, H/16 * W/16, 4 * latent
    channels), scaled like the latents Flux denoises, in the transformer's dtype on the VAE's device.
    The VAE's mean (not a sample): deterministic."""
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    vae = pipe.vae
    lat = retrieve_latents(vae.encode(x.to(device=vae.device, dtype=vae.dtype)), sample_mode="argmax")
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    return pack(lat).to(pipe.transformer.dtype)


def pack(lat: torch.Tensor) -> torch.Tensor:
    """(B, C, 2 rows, 2 cols) latents -> (B, rows * cols, 4 C) tokens: ``FluxPipeline._pack_latents``."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline._pack_latents(lat, lat.shape[0], lat.shape[1], lat.shape[2], lat.shape[3])


def encode_image(pipe, image, what: str = "image") -> tuple[torch.Tensor, tuple[int, int]]:
    """Encode ``image`` (PIL, array (H, W, 3) or tensor (3, H, W) / (B, 3, H, W), float in [0, 1]
    or uint8) with the pipeline's VAE into packed tokens, scaled like the latents Flux denoises.

    Returns ``(tokens, (rows, cols))``: tokens (B, rows * cols, 4 * latent_channels) in the
    transformer's dtype on the VAE's device. The VAE's mean (not a sample): deterministic.
    """
    x = image_tensor(pipe, image, what)
    return encode(pipe, x), token_grid(pipe, x.shape[2], x.shape[3])


def latent_dtype(pipe, prompt_embeds: torch.Tensor | None = None) -> torch.dtype:
    """The dtype ``FluxPipeline`` gives its latents: the prompt embeddings' (T5's, or the given ones)."""
    if prompt_embeds is not None:
        return prompt_embeds.dtype
    t5 = getattr(pipe, "text_encoder_2", None)
    return t5.dtype if t5 is not None else pipe.transformer.dtype


def initial_noise(pipe, batch: int, rows: int, cols: int, generator, device, dtype) -> torch.Tensor:
    """The packed noise (batch, rows * cols, C) a ``FluxPipeline`` call with this ``generator`` starts
    from: diffusers' ``randn_tensor`` over (batch, C/4, 2 rows, 2 cols) latents, then packed. Any
    generator diffusers takes works (CPU, or one on ``device``: a CUDA generator draws on the GPU)."""
    from diffusers.utils.torch_utils import randn_tensor

    channels = pipe.transformer.config.in_channels // 4
    shape = (batch, channels, PATCH * rows, PATCH * cols)
    noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
    return pack(noise)


def check_generator(generator, batch: int, device, what: str = "generator") -> None:
    """``generator``: None, a ``torch.Generator`` on the CPU or on ``device``'s type, or a list of
    ``batch`` of them (as diffusers' ``randn_tensor`` takes)."""
    if generator is None:
        return
    gens = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(generator) not in (1, batch):
        raise ValueError(f"{what} is a list of {len(generator)} generators; give one, or one per image ({batch})")
    dev = torch.device(device).type
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"{what} must be a torch.Generator (or a list of them), got {type(g).__name__}")
        if g.device.type not in ("cpu", dev):
            raise ValueError(f"{what} is a {g.device.type} generator but the latents are on {dev}: "
                             f"give a cpu or {dev} generator")


def _mask_tensor(mask, what: str = "mask") -> torch.Tensor:
    """(H, W) bool from a PIL image, array or tensor; nonzero (> 0.5 for floats, which must be in
    [0, 1] as diffusers' mask processor expects them) means masked."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{what} must be a PIL image, numpy array or torch tensor (H, W), got {type(mask).__name__}")
    m = mask.detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() == 3 and m.shape[-1] in (1, 3, 4):  # (H, W, C) array: any channel set masks the pixel
        m = m.amax(-1)
    if m.dim() != 2:
        raise ValueError(f"{what} must be 2-D (H, W) (unit leading dims allowed), got shape {tuple(mask.shape)}")
    if m.is_floating_point():
        if m.numel() and not (0.0 <= float(m.min()) and float(m.max()) <= 1.0):
            raise ValueError(f"{what} is a float mask with values in [{float(m.min()):g}, {float(m.max()):g}]: float "
                             "masks must be in [0, 1] (> 0.5 marks a pixel); give 0-255 masks as uint8")
        return m > 0.5
    return m != 0


def token_mask(mask, height: int, width: int, pixels: int = 16, what: str = "mask") -> torch.Tensor:
    """Pixel mask -> (rows * cols,) bool token mask, row-major like the packed latents.

    A token is masked when any pixel of its ``pixels`` x ``pixels`` patch is masked, so no masked
    pixel ever ends up in the preserved region. The mask must be ``height`` x ``width``.
    """
    m = _mask_tensor(mask, what)
    if tuple(m.shape) != (height, width):
        raise ValueError(f"{what} is {m.shape[0]}x{m.shape[1]} pixels but the image is {height}x{width}; "
                         f"give a ({height}, {width}) mask")
    pooled = F.max_pool2d(m[None, None].float(), kernel_size=pixels)
    return pooled.flatten().bool()
