"""Image steps every image family shares: VAE encode and decode (tiled when the plan or an
out-of-memory says so, fp32 again when fp16 overflows), tensor -> PIL, where and how PNGs are saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.engine.context import JobContext, UserError
from studio.engine.pipelines.diffusion.skeleton import output_target
from studio.nn.tiling import decode_with_fallback, tiled_encode
from studio.protocol import ImageJob


def to_pil(image: torch.Tensor):
    from PIL import Image

    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def encode_image(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, h, w), tiled when large."""
    vae = model.vae

    def enc(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x)[0]

    mean = tiled_encode(enc, pixels, tile=512, overlap=64, scale=vae.downscale) if max(pixels.shape[-2:]) > 1024 \
        else enc(pixels)
    return vae.to_latent(mean).float()


def vae_needs_tiles(plan, names: dict[str, str], mem) -> bool:
    """Tile from the start when the whole-image decode's working memory would break the budget."""
    if mem.budget is None:
        return False
    return plan.activations.get(names["vae"], 0) + plan.shapes[names["vae"]].bytes > mem.budget


def decode(model: Any, latent: torch.Tensor, ctx: JobContext, tiled: bool = False) -> torch.Tensor:
    vae = model.vae
    dtype = next(vae.parameters()).dtype

    def dec(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(next(vae.parameters()).dtype))

    z = vae.from_latent(latent.float())
    tiles = (96, 64, 32) if tiled else (None, 96, 64, 32)
    image = decode_with_fallback(dec, z, tiles=tiles, scale=vae.downscale,
                                 on_fallback=lambda failed, nxt: ctx.progress(0, 1, f"decoding in tiles of {nxt}"))
    if not torch.isfinite(image).all() and dtype != torch.float32:
        # fp16 VAEs (SDXL's above all) overflow to NaN; fp32 is the usual fix, done here automatically
        vae.float()
        try:
            image = decode_with_fallback(lambda zz: vae.decode(zz.float()), z.float(), scale=vae.downscale)
        finally:
            vae.to(dtype)
    if not torch.isfinite(image).all():
        raise UserError("nan", "The image came out as NaN (all black). This usually means the VAE overflowed or "
                        "the model file is damaged: try another VAE (an fp32 or 'fp16-fix' VAE for SDXL), fewer "
                        "LoRAs or a lower LoRA weight.")
    return image


def image_target(job: ImageJob, ctx: JobContext) -> tuple[Path, str]:
    return output_target(job.out, ".png", ctx, Path.home() / "Pictures" / "Studio")


def save_png(image, meta: dict, folder: Path, stem: str) -> Path:
    from studio.library.pngmeta import unique_output_path, write_png

    try:
        path = unique_output_path(folder, stem)
        write_png(path, image, meta)
    except OSError as exc:
        raise UserError("bad_input", f"Cannot save the image in {folder}: {exc}. Pick another outputs folder in "
                        "Settings.") from None
    return path


def model_hash(path: str) -> str | None:
    """The library's sha256 of the model file, when it has been computed (no hashing of GBs here)."""
    try:
        from studio.library.library import Library, LibraryError

        with Library() as lib:
            entry = lib.get(str(path))
            return entry.sha256 if entry is not None else None
    except (LibraryError, OSError):
        return None
