import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResizeCrop,
    normalize,
    parse_resize_crop,
    resize_to_input,
    stack_uint8,
    train_resize_size,
    train_transform,
)


def gradient_image(width=40, height=30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    arr = np.stack([x, y, 255 - x], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_resize_to_input_is_square_uint8_and_matches_pil_bilinear():
    img = gradient_image(40, 30)
    t = resize_to_input(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.uint8
    expected = np.asarray(img.resize((16, 16), Image.BILINEAR))
    assert np.array_equal(t.permute(1, 2, 0).numpy(), expected)
    # Aspect ratio is not kept: the left column still holds the left edge of the image.
    assert t[0, :, 0].max() < 30 and t[0, :, -1].min() > 225


def test_resize_to_input_keeps_an_image_already_at_size():
    img = gradient_image(16, 16)
    assert np.array_equal(resize_to_input(img, 16).permute(1, 2, 0).numpy(), np.asarray(img))
    assert resize_to_input(img.convert("L"), 8).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="positive"):
        resize_to_input(img, 0)


def test_stack_uint8():
    batch = stack_uint8([resize_to_input(gradient_image(), 8) for _ in range(3)])
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == torch.uint8
    with pytest.raises(ValueError, match="image 1 is"):
        stack_uint8([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 9, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="image 0 is .*torch.float32"):
        stack_uint8([torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="empty"):
        stack_uint8([])


def test_normalize_values():
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    batch[0] = 255
    out = normalize(batch, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)
        assert out[1, c, 2, 3].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-5)
    half = normalize(torch.full((1, 3, 1, 1), 51, dtype=torch.uint8), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5))
    assert half.flatten().tolist() == pytest.approx([0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="uint8"):
        normalize(batch.float())
    with pytest.raises(ValueError, match="3 values"):
        normalize(batch, (0.5,), (0.5,))


def test_train_resize_size():
    assert train_resize_size(224) == 256
    assert train_resize_size(64) == 73


@pytest.mark.parametrize("make_rng", [lambda s: torch.Generator().manual_seed(s), random.Random])
def test_train_transform_is_a_crop_of_the_resize_and_deterministic(make_rng):
    img = gradient_image(50, 40)
    size = 32
    big = resize_to_input(img, train_resize_size(size))
    outs = [train_transform(img, size, make_rng(seed)) for seed in range(12)]
    assert all(o.shape == (3, size, size) and o.dtype == torch.uint8 for o in outs)
    assert torch.equal(train_transform(img, size, make_rng(3)), outs[3])
    flips = 0
    for o in outs:
        found = False
        for candidate, flipped in ((o, False), (o.flip(-1), True)):
            for top in range(big.shape[1] - size + 1):
                for left in range(big.shape[2] - size + 1):
                    if torch.equal(big[:, top : top + size, left : left + size], candidate):
                        found, flips = True, flips + flipped
                        break
                if found:
                    break
            if found:
                break
        assert found, "every output must be a (possibly flipped) crop of the square resize"
    assert 0 < flips < len(outs)  # both flipped and unflipped outputs occur
    assert len({o.numpy().tobytes() for o in outs}) > 6


def test_train_transform_rejects_other_rngs():
    with pytest.raises(TypeError, match="torch.Generator or random.Random"):
        train_transform(gradient_image(), 16, np.random.default_rng(0))


# --- the official SAT test frame (--resize-crop) ---------------------------------------


def test_resize_crop_equals_torchvision_resize_then_center_crop():
    from torchvision import transforms

    img = gradient_image(50, 37)
    for resize, crop in ((256, 224), (20, 16), (21, 16)):  # 21 - 16 = 5: torchvision rounds 2.5 to 2
        frame = ResizeCrop(resize, crop)
        got = frame.to_input(img)
        assert got.shape == (3, crop, crop) and got.dtype == torch.uint8 and got.is_contiguous()
        expected = transforms.Compose([transforms.Resize((resize, resize)), transforms.CenterCrop(crop)])(img)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(expected)), (resize, crop)


def test_resize_crop_window_in_original_pixels_by_hand():
    frame = ResizeCrop(256, 224)
    assert frame.offset == 16
    # The crop is resized pixels [16, 240): x in [16 W/256, 240 W/256), y likewise.
    assert frame.window(512, 256) == (32.0, 16.0, 480.0, 240.0)
    assert frame.window(500, 375) == (31.25, 23.4375, 468.75, 351.5625)
    assert frame.window(256, 256) == (16.0, 16.0, 240.0, 240.0)
    assert ResizeCrop(20, 16).offset == 2 and ResizeCrop(16, 16).window(7, 9) == (0.0, 0.0, 7.0, 9.0)


def test_parse_resize_crop_and_its_errors_name_the_flag():
    assert parse_resize_crop("256,224") == ResizeCrop(256, 224)
    assert parse_resize_crop(" 72, 64 ") == ResizeCrop(72, 64)
    for bad in ("256x224", "256", "256,224,1", "a,b"):
        with pytest.raises(ValueError, match="--resize-crop must be RESIZE,CROP"):
            parse_resize_crop(bad)
    for bad in ("200,224", "0,0"):
        with pytest.raises(ValueError, match="--resize-crop .*RESIZE >= CROP >= 1"):
            parse_resize_crop(bad)
