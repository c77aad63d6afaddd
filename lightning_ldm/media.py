"""Pictures of samples: uint8 conversion, image and video grids, PNG and GIF encoding.

Layouts: images are ``(B, C, H, W)``, videos ``(B, T, C, H, W)`` (frames second, as TensorBoard's ``add_video`` and
``wandb.Video`` take them), with C = 1 (grey) or 3 (RGB). Grids and frames handed to the encoders are uint8: convert
model outputs first with :func:`to_uint8`. PNG and GIF encoding use Pillow (imported when first needed).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ldm._checks import check_floating, check_int, check_real, check_value_range

__all__ = [
    "check_value_range",
    "encode_gif",
    "encode_png",
    "frame_strip",
    "image_grid",
    "to_uint8",
    "video_grid",
    "write_gif",
    "write_labelled_gif",
    "write_png",
]

_CHANNELS = (1, 3)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is installed wherever the tests run
        message = 'writing PNG or GIF files needs Pillow: pip install "lightning_ldm[logging]"'
        raise ModuleNotFoundError(message, name="PIL") from err
    return Image


def to_uint8(x: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
    """Map ``x`` from ``value_range`` to uint8 on the CPU: ``round(255·clamp((x − low)/(high − low), 0, 1))``.

    NaN maps to 0; the shape is kept.

    Args:
        x: Floating tensor (any shape, any device).
        value_range: ``(low, high)``: the values shown as black and white.

    Returns:
        uint8 CPU tensor of ``x``'s shape.

    Raises:
        TypeError: ``x`` is not a floating tensor, or ``value_range`` is not a pair of numbers.
        ValueError: ``value_range`` is empty.
    """
    check_floating("x", x)
    low, high = check_value_range(value_range)
    scaled = ((x.detach().float().cpu() - low) / (high - low)).nan_to_num(0.0).clamp(0.0, 1.0)
    return (scaled * 255.0).round().to(torch.uint8)


def _check_uint8(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        described = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a uint8 tensor (convert with to_uint8), got {described}")
    if x.ndim != ndim or x.shape[-3] not in _CHANNELS or min(x.shape) < 1:
        raise ValueError(
            f"{name} must have layout {layout} with C in {_CHANNELS} and no empty axis, got {tuple(x.shape)}"
        )


def image_grid(images: Tensor, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> Tensor:
    """Tile ``(B, C, H, W)`` uint8 images into one ``(C, H', W')`` picture, row by row.

    Args:
        images: uint8 images.
        nrow: Images per row (``ceil(√B)`` when ``None``).
        padding: Pixels between images and around the border.
        pad_value: Value of the padding pixels (0-255).

    Returns:
        uint8 tensor ``(C, rows·(H + p) + p, nrow·(W + p) + p)`` with ``rows = ceil(B/nrow)``.

    Raises:
        TypeError: ``images`` is not uint8, or an option is not an integer.
        ValueError: ``images`` is not ``(B, C, H, W)`` with C in (1, 3), or an option is out of range.
    """
    _check_uint8("images", images, 4, "(B, C, H, W)")
    batch, channels, height, width = images.shape
    ncol = check_int("nrow", nrow, minimum=1) if nrow is not None else math.ceil(math.sqrt(batch))
    padding = check_int("padding", padding, minimum=0)
    pad_value = check_int("pad_value", pad_value, minimum=0, maximum=255)
    ncol = min(ncol, batch)
    nrows = math.ceil(batch / ncol)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, nrows * cell_h + padding, ncol * cell_w + padding), pad_value)
    for index in range(batch):
        row, col = divmod(index, ncol)
        top, left = row * cell_h + padding, col * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def video_grid(videos: Tensor, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> Tensor:
    """Tile ``(B, T, C, H, W)`` uint8 clips into one ``(T, C, H', W')`` clip: frame k is the grid of every frame k.

    Args:
        videos: uint8 clips.
        nrow: Clips per row (``ceil(√B)`` when ``None``).
        padding: Pixels between clips and around the border.
        pad_value: Value of the padding pixels (0-255).

    Returns:
        uint8 tensor ``(T, C, H', W')`` (see :func:`image_grid` for ``H'`` and ``W'``).

    Raises:
        TypeError: ``videos`` is not uint8.
        ValueError: ``videos`` is not ``(B, T, C, H, W)`` with C in (1, 3), or an option is out of range.
    """
    _check_uint8("videos", videos, 5, "(B, T, C, H, W)")
    frames = [image_grid(videos[:, k], nrow=nrow, padding=padding, pad_value=pad_value) for k in range(videos.shape[1])]
    return torch.stack(frames)


def frame_strip(videos: Tensor, *, padding: int = 2, pad_value: int = 0) -> Tensor:
    """A still picture of ``(B, T, C, H, W)`` uint8 clips: one row per clip, its frames left to right.

    Args:
        videos: uint8 clips.
        padding: Pixels between frames and around the border.
        pad_value: Value of the padding pixels (0-255).

    Returns:
        uint8 tensor ``(C, B·(H + p) + p, T·(W + p) + p)``.

    Raises:
        TypeError: ``videos`` is not uint8.
        ValueError: ``videos`` is not ``(B, T, C, H, W)`` with C in (1, 3).
    """
    _check_uint8("videos", videos, 5, "(B, T, C, H, W)")
    return image_grid(videos.flatten(0, 1), nrow=videos.shape[1], padding=padding, pad_value=pad_value)


def _to_pil(image: Tensor) -> Any:
    """``(C, H, W)`` uint8 → PIL image (mode ``"L"`` or ``"RGB"``)."""
    array = image.permute(1, 2, 0).contiguous().numpy()
    return _pil().fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def encode_png(image: Tensor) -> bytes:
    """PNG bytes of a ``(C, H, W)`` uint8 image.

    Raises:
        TypeError: ``image`` is not uint8.
        ValueError: ``image`` is not ``(C, H, W)`` with C in (1, 3).
    """
    _check_uint8("image", image, 3, "(C, H, W)")
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_gif(frames: Tensor, *, fps: float = 8.0) -> bytes:
    """Animated, looping GIF bytes of ``(T, C, H, W)`` uint8 frames.

    Args:
        frames: uint8 frames.
        fps: Frames per second (GIF stores hundredths of a second per frame: ``max(round(100/fps), 1)``).

    Returns:
        The GIF file's bytes.

    Raises:
        TypeError: ``frames`` is not uint8.
        ValueError: ``frames`` is not ``(T, C, H, W)`` with C in (1, 3), or ``fps`` is not positive.
    """
    _check_uint8("frames", frames, 4, "(T, C, H, W)")
    fps = check_real("fps", fps, minimum=0.0, min_inclusive=False)
    images = [_to_pil(frame) for frame in frames]
    buffer = io.BytesIO()
    duration = 10 * max(round(100.0 / fps), 1)  # in ms, a whole number of centiseconds
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()


def write_png(path: str | Path, image: Tensor) -> Path:
    """Write a ``(C, H, W)`` uint8 image as PNG (parent folders are created) and return the path.

    Raises:
        TypeError: ``image`` is not uint8.
        ValueError: ``image`` is not ``(C, H, W)`` with C in (1, 3).
    """
    data = encode_png(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_gif(path: str | Path, frames: Tensor, *, fps: float = 8.0) -> Path:
    """Write ``(T, C, H, W)`` uint8 frames as a looping GIF (parent folders are created) and return the path.

    Raises:
        TypeError: ``frames`` is not uint8.
        ValueError: ``frames`` is not ``(T, C, H, W)`` with C in (1, 3), or ``fps`` is not positive.
    """
    data = encode_gif(frames, fps=fps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_labelled_gif(
    path: str | Path,
    rows: Mapping[str, Tensor],
    *,
    value_range: Sequence[float] = (-1.0, 1.0),
    scale: int = 4,
    frame_ms: int = 150,
    label_width: int = 96,
) -> Path:
    """Write a looping GIF with one labelled row of clips per entry of ``rows`` (e.g. one row per model).

    Args:
        path: Output file (parent folders are created).
        rows: Label → ``(N, T, C, H, W)`` floating clips in ``value_range``; every row has the same T, H and W.
        value_range: ``(low, high)`` of the clips.
        scale: Nearest-neighbour upscaling of each pixel.
        frame_ms: Duration of each frame in milliseconds.
        label_width: Width in pixels of the label column.

    Returns:
        ``path``.

    Raises:
        ValueError: ``rows`` is empty, a row is not ``(N, T, C, H, W)`` with C in (1, 3), the rows' T, H, W differ,
            or an option is out of range.
        TypeError: A row is not a floating tensor.
    """
    scale = check_int("scale", scale, minimum=1)
    frame_ms = check_int("frame_ms", frame_ms, minimum=1)
    label_width = check_int("label_width", label_width, minimum=0)
    if not rows:
        raise ValueError("rows must hold at least one labelled row of clips, got an empty mapping")
    clips = {label: to_uint8(x, value_range) for label, x in rows.items()}
    for label, x in clips.items():
        _check_uint8(f"rows[{label!r}]", x, 5, "(N, T, C, H, W)")
    sizes = {tuple(x.shape[i] for i in (1, 3, 4)) for x in clips.values()}
    if len(sizes) != 1:
        raise ValueError(f"every row must have the same (T, H, W), got {sorted(sizes)}")
    Image = _pil()
    from PIL import ImageDraw

    frames, height, width = next(iter(sizes))
    height, width, gap = height * scale, width * scale, 2
    columns = max(x.shape[0] for x in clips.values())
    canvas_w, canvas_h = label_width + columns * (width + gap), len(clips) * (height + gap)
    images = []
    for k in range(frames):
        canvas = Image.new("RGB", (canvas_w, canvas_h), (40, 40, 40))
        draw = ImageDraw.Draw(canvas)
        for r, (label, x) in enumerate(clips.items()):
            top = r * (height + gap)
            draw.text((4, top + height // 2 - 6), label, fill=(230, 230, 230))
            for c in range(x.shape[0]):
                tile = _to_pil(x[c, k]).convert("RGB").resize((width, height), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_width + c * (width + gap), top))
        draw.text((4, canvas_h - 12), f"frame {k}", fill=(200, 200, 90))
        images.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path
