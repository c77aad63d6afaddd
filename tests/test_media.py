from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lightning_ldm.media import (
    check_value_range,
    encode_gif,
    encode_png,
    frame_strip,
    image_grid,
    to_uint8,
    video_grid,
    write_gif,
    write_labelled_gif,
    write_png,
)


def _gif_frames(data: bytes, mode: str) -> tuple[list[np.ndarray], list[int]]:
    image = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for k in range(image.n_frames):
        image.seek(k)
        frames.append(np.asarray(image.convert(mode)))
        durations.append(image.info["duration"])
    return frames, durations


# ---------------------------------------------------------------------------------------------------------- to_uint8
def test_to_uint8_golden_values() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0, float("nan"), -0.5, 0.999])
    # round(255 * (x + 1) / 2), clamped, NaN -> 0; 127.5 rounds half to even -> 128, 63.75 -> 64, 254.87 -> 255
    assert to_uint8(x).tolist() == [0, 128, 255, 0, 255, 0, 64, 255]
    assert to_uint8(torch.tensor([0.25, 0.5]), (0.0, 1.0)).tolist() == [64, 128]
    assert to_uint8(torch.tensor([10.0], dtype=torch.bfloat16), (0, 20)).dtype == torch.uint8


@pytest.mark.parametrize(
    ("value_range", "error", "match"),
    [
        ((1.0, 1.0), ValueError, r"value_range=\(1, 1\) is empty; expected low < high"),
        ((2.0, -1.0), ValueError, "expected low < high"),
        ((0.0,), TypeError, "value_range must be a pair"),
        ("01", TypeError, "value_range must be a pair"),
        ((0.0, float("inf")), ValueError, r"value_range\[1\]=inf must be finite"),
    ],
)
def test_value_range_errors(value_range: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_value_range(value_range)  # type: ignore[arg-type]


def test_to_uint8_rejects_integer_tensors() -> None:
    with pytest.raises(TypeError, match=r"x must be a floating tensor \(e.g. torch.float32.*\), got a tensor .*int64"):
        to_uint8(torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------------------ grids
def test_image_grid_golden_layout() -> None:
    images = torch.stack([torch.full((1, 2, 3), 10 * (i + 1), dtype=torch.uint8) for i in range(5)])
    grid = image_grid(images, nrow=2, padding=1, pad_value=7)
    assert grid.shape == (1, 3 * (2 + 1) + 1, 2 * (3 + 1) + 1)
    expected = torch.full((1, 10, 9), 7, dtype=torch.uint8)
    for i in range(5):
        row, col = divmod(i, 2)
        expected[:, 1 + 3 * row : 3 + 3 * row, 1 + 4 * col : 4 + 4 * col] = 10 * (i + 1)
    assert torch.equal(grid, expected)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 7),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 4),
    width=st.integers(1, 4),
    nrow=st.one_of(st.none(), st.integers(1, 8)),
    padding=st.integers(0, 3),
)
def test_image_grid_places_every_image_once(
    batch: int, channels: int, height: int, width: int, nrow: int | None, padding: int
) -> None:
    images = torch.randint(1, 256, (batch, channels, height, width), dtype=torch.uint8)
    grid = image_grid(images, nrow=nrow, padding=padding, pad_value=0)
    ncol = min(nrow if nrow is not None else math.ceil(math.sqrt(batch)), batch)
    rows = math.ceil(batch / ncol)
    assert grid.shape == (channels, rows * (height + padding) + padding, ncol * (width + padding) + padding)
    covered = torch.zeros(grid.shape[1:], dtype=torch.bool)
    for i in range(batch):
        r, c = divmod(i, ncol)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        assert torch.equal(grid[:, top : top + height, left : left + width], images[i])
        covered[top : top + height, left : left + width] = True
    assert int((grid[:, ~covered] != 0).sum()) == 0  # everything else is padding


def test_video_grid_and_frame_strip() -> None:
    videos = torch.randint(0, 256, (3, 4, 3, 2, 5), dtype=torch.uint8)
    tiled = video_grid(videos, nrow=2, padding=1)
    assert tiled.shape == (4, 3, 2 * 3 + 1, 2 * 6 + 1)
    for k in range(4):
        assert torch.equal(tiled[k], image_grid(videos[:, k], nrow=2, padding=1))
    strip = frame_strip(videos, padding=1)
    assert strip.shape == (3, 3 * 3 + 1, 4 * 6 + 1)
    assert torch.equal(strip[:, 1 + 3 * 2 : 3 + 3 * 2, 1 + 6 * 3 : 6 + 6 * 3], videos[2, 3])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: image_grid(torch.zeros(2, 3, 4, 4)), TypeError, "images must be a uint8 tensor.*torch.float32"),
        (lambda: image_grid(torch.zeros(2, 2, 4, 4, dtype=torch.uint8)), ValueError, r"C in \(1, 3\).*\(2, 2, 4, 4\)"),
        (lambda: image_grid(torch.zeros(3, 4, 4, dtype=torch.uint8)), ValueError, r"layout \(B, C, H, W\)"),
        (lambda: image_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), nrow=0), ValueError, "nrow=0 is out of range"),
        (lambda: image_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), pad_value=256), ValueError, "pad_value=256"),
        (lambda: video_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)), ValueError, r"layout \(B, T, C, H, W\)"),
        (lambda: encode_gif(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), fps=0), ValueError, "fps=0 is out of range"),
        (lambda: encode_png(torch.zeros(1, 4, 4)), TypeError, "image must be a uint8 tensor"),
    ],
)
def test_grid_and_encoder_errors(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


# --------------------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_lossless(tmp_path: object, channels: int) -> None:
    image = torch.randint(0, 256, (channels, 5, 7), dtype=torch.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
    expected = image.permute(1, 2, 0).numpy()
    assert np.array_equal(decoded, expected[..., 0] if channels == 1 else expected)
    path = write_png(tmp_path / "a" / "b.png", image)  # type: ignore[operator]
    assert path.read_bytes() == encode_png(image)


@pytest.mark.parametrize(("channels", "fps", "duration"), [(1, 5.0, 200), (3, 8.0, 120), (3, 3.0, 330), (1, 500.0, 10)])
def test_gif_frames_and_timing(tmp_path: object, channels: int, fps: float, duration: int) -> None:
    # at most 4 levels per channel (64 colours): the GIF palette holds them exactly
    frames = (torch.randint(0, 4, (4, channels, 6, 5)) * 85).to(torch.uint8)
    decoded, durations = _gif_frames(encode_gif(frames, fps=fps), "L" if channels == 1 else "RGB")
    assert len(decoded) == 4 and durations == [duration] * 4
    for k in range(4):
        expected = frames[k].permute(1, 2, 0).numpy()
        assert np.array_equal(decoded[k], expected[..., 0] if channels == 1 else expected)
    path = write_gif(tmp_path / "clip.gif", frames, fps=fps)  # type: ignore[operator]
    assert path.read_bytes() == encode_gif(frames, fps=fps)


def test_labelled_gif_layout(tmp_path: object) -> None:
    rows = {"a": torch.rand(2, 3, 1, 4, 5) * 2 - 1, "b": torch.rand(3, 3, 3, 4, 5) * 2 - 1}
    path = write_labelled_gif(tmp_path / "rows.gif", rows, scale=2, frame_ms=50, label_width=10)  # type: ignore[operator]
    image = Image.open(path)
    assert image.n_frames == 3 and image.info["duration"] == 50
    assert image.size == (10 + 3 * (5 * 2 + 2), 2 * (4 * 2 + 2))
    image.seek(0)
    tile = np.asarray(image.convert("RGB"))[0:8:2, 10 : 10 + 10 : 2]  # first clip of row "a", frame 0
    expected = to_uint8(rows["a"][0, 0, 0]).numpy()
    assert np.abs(tile[..., 0].astype(int) - expected.astype(int)).max() <= 8  # GIF palette quantisation


def test_labelled_gif_errors(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="rows must hold at least one labelled row"):
        write_labelled_gif(tmp_path / "x.gif", {})  # type: ignore[operator]
    rows = {"a": torch.zeros(1, 3, 1, 4, 4), "b": torch.zeros(1, 2, 1, 4, 4)}
    with pytest.raises(ValueError, match=r"same \(T, H, W\), got \[\(2, 4, 4\), \(3, 4, 4\)\]"):
        write_labelled_gif(tmp_path / "x.gif", rows)  # type: ignore[operator]
    with pytest.raises(ValueError, match="scale=0 is out of range"):
        write_labelled_gif(tmp_path / "x.gif", rows, scale=0)  # type: ignore[operator]
