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


def _image_tensor(pipe, image, what: str) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] through the pipeline's own image processor; PIL converts to RGB."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - diffusers depends on Pillow
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = image.convert("RGB")
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    if isinstance(image, np.ndarray) and image.ndim == 2:
        raise ValueError(f"{what} must be an RGB image (H, W, 3), got a 2-D array of shape {image.shape}")
    if isinstance(image, torch.Tensor):
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{what} must be an RGB tensor (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
    elif isinstance(image, np.ndarray) and (image.ndim not in (3, 4) or image.shape[-1] != 3):
        raise ValueError(f"{what} must be an RGB array (H, W, 3), got shape {image.shape}")
    if isinstance(image, torch.Tensor):
        h, w = image.shape[-2:]
    elif isinstance(image, np.ndarray):
        h, w = image.shape[-3:-1]
    else:
        w, h = image.size
    token_grid(pipe, h, w)  # the image processor would silently crop: say so instead
    x = pipe.image_processor.preprocess(image)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels, got a tensor of shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def encode_image(pipe, image, what: str = "image") -> tuple[torch.Tensor, tuple[int, int]]:
    """Encode ``image`` (PIL, array (H, W, 3) or tensor (3, H, W) / (B, 3, H, W) in [0, 1]) with
    the pipeline's VAE into packed tokens, scaled like the latents Flux denoises.

    Returns ``(tokens, (rows, cols))``: tokens (B, rows * cols, 4 * latent_channels) in the
    transformer's dtype on the VAE's device. The VAE's mean (not a sample): deterministic.
    """
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

    x = _image_tensor(pipe, image, what)
    rows, cols = token_grid(pipe, x.shape[2], x.shape[3])
    vae = pipe.vae
    x = x.to(device=vae.device, dtype=vae.dtype)
    lat = retrieve_latents(vae.encode(x), sample_mode="argmax")
    lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
    tokens = FluxPipeline._pack_latents(lat, lat.shape[0], lat.shape[1], lat.shape[2], lat.shape[3])
    return tokens.to(pipe.transformer.dtype), (rows, cols)


def _mask_tensor(mask) -> torch.Tensor:
    """(H, W) bool from a PIL image, array or tensor; nonzero (> 0.5 for floats) means masked."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a PIL image, numpy array or torch tensor, got {type(mask).__name__}")
    m = mask.detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() == 3 and m.shape[-1] in (1, 3, 4):  # (H, W, C) array: any channel set masks the pixel
        m = m.amax(-1)
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W) (unit leading dims allowed), got shape {tuple(mask.shape)}")
    return m > 0.5 if m.is_floating_point() else m != 0


def token_mask(mask, height: int, width: int, pixels: int = 16) -> torch.Tensor:
    """Pixel mask -> (rows * cols,) bool token mask, row-major like the packed latents.

    A token is masked when any pixel of its ``pixels`` x ``pixels`` patch is masked, so no masked
    pixel ever ends up in the preserved region. The mask must be ``height`` x ``width``.
    """
    m = _mask_tensor(mask)
    if tuple(m.shape) != (height, width):
        raise ValueError(f"mask is {m.shape[0]}x{m.shape[1]} pixels but the image is {height}x{width}")
    pooled = F.max_pool2d(m[None, None].float(), kernel_size=pixels)
    return pooled.flatten().bool()
