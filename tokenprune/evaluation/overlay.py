"""The picture ``tokenprune run`` saves: the image with the patches each stage kept highlighted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["overlay_panels", "save_overlay", "model_view"]


def model_view(image, inputs, processor):
    """The image as the model sees it (after resize and crop), as a PIL image.

    Un-normalises ``inputs["pixel_values"]`` when it is a single ``(1, 3, H, W)`` image (LLaVA-style
    processors); otherwise returns ``image`` unchanged.
    """
    from PIL import Image

    pv = inputs.get("pixel_values") if hasattr(inputs, "get") else None
    ip = getattr(processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if pv is None or pv.dim() != 4 or pv.shape[0] != 1 or pv.shape[1] != 3 or mean is None or std is None:
        return image
    x = pv[0].float().cpu().numpy().transpose(1, 2, 0)
    x = x * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    if getattr(ip, "do_rescale", True):
        x = x * 255.0
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))


def overlay_panels(image, grid, stages, *, min_size: int = 336):
    """One panel per stage: kept patches at full brightness and outlined, the others dimmed.

    Parameters
    ----------
    image : PIL.Image.Image
        The image as the model sees it.
    grid : (int, int)
        ``(rows, cols)`` of the patch grid.
    stages : list of (str, array-like of int)
        ``(label, kept raster patch indices)`` per stage, in order; an all-kept panel is not added
        automatically.
    min_size : int
        Panels are upscaled (nearest) to at least this many pixels on the short side.

    Returns
    -------
    PIL.Image.Image
        The panels side by side, each with its label above.
    """
    from PIL import Image, ImageDraw

    rows, cols = grid
    base = image.convert("RGB")
    scale = max(1, int(np.ceil(min_size / min(base.size))))
    base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    w, h = base.size
    ph, pw = h / rows, w / cols
    label_h = 22
    canvas = Image.new("RGB", (len(stages) * (w + 8) + 8, h + label_h + 8), (255, 255, 255))
    arr = np.asarray(base, dtype=np.float32)
    for i, (label, kept) in enumerate(stages):
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        mask = np.zeros(rows * cols, dtype=bool)
        mask[kept[(kept >= 0) & (kept < rows * cols)]] = True
        ys = (np.arange(h) / ph).astype(int).clip(0, rows - 1)
        xs = (np.arange(w) / pw).astype(int).clip(0, cols - 1)
        m = mask.reshape(rows, cols)[ys][:, xs]
        dim = arr * 0.22 + np.array([40, 40, 40], dtype=np.float32) * 0.3
        panel = Image.fromarray(np.where(m[..., None], arr, dim).clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(panel)
        for idx in np.flatnonzero(mask):
            r, c = divmod(int(idx), cols)
            d.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], outline=(255, 215, 0))
        x0 = 8 + i * (w + 8)
        canvas.paste(panel, (x0, label_h + 4))
        ImageDraw.Draw(canvas).text((x0, 4), f"{label}: {int(mask.sum())}/{rows * cols}", fill=(0, 0, 0))
    return canvas


def save_overlay(image, grid, stages, path) -> Path:
    """:func:`overlay_panels` saved to ``path`` (format from the extension, e.g. PNG)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    overlay_panels(image, grid, stages).save(path)
    return path
