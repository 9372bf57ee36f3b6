"""model/cam.py: the CAM baseline on the same backbone, returning the same LocOutput."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model import LocOutput, create_model
from model.cam import CAMVisionTransformer, normalize_cam


def micro_cam(num_classes: int = 6) -> CAMVisionTransformer:
    torch.manual_seed(0)
    return create_model("cam_vit_micro_patch8_64", num_classes, drop_path_rate=0.0).eval()


def hand_class_maps(model: CAMVisionTransformer, x: torch.Tensor) -> np.ndarray:
    """B x classes x 8 x 8 class maps: 3x3 zero-padded conv of the final patch tokens, in numpy."""
    with torch.no_grad():
        tokens = model.forward_features(x)  # timm's: final-norm tokens [cls, patches]
    patches = tokens[:, 1:].numpy().astype(np.float64).reshape(x.shape[0], 8, 8, -1)  # row-major grid
    weight = model.head.conv.weight.detach().numpy().astype(np.float64)  # K x C x 3 x 3
    bias = model.head.conv.bias.detach().numpy().astype(np.float64)
    padded = np.pad(patches, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((x.shape[0], weight.shape[0], 8, 8))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy:dy + 8, dx:dx + 8, :]  # B x 8 x 8 x C
            out += np.einsum("byxc,kc->bkyx", window, weight[:, :, dy, dx])
    return out + bias[None, :, None, None]


def hand_normalise(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return (cam - cam.min()) / max(cam.max() - cam.min(), 1e-12)


def test_same_result_type_and_shapes():
    model = micro_cam()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert isinstance(out, LocOutput)
    assert out.logits.shape == (3, 6) and out.loc_map.shape == (3, 1, 8, 8)
    assert out.loc_map.dtype == torch.float32
    # Normalised per image: each map spans exactly [0, 1].
    flat = out.loc_map.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(3))
    torch.testing.assert_close(flat.max(1).values, torch.ones(3))


def test_deit_tiny_cam_shapes():
    torch.manual_seed(0)
    model = create_model("cam_deit_tiny_patch16_224", 200).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.logits.shape == (1, 200) and out.loc_map.shape == (1, 1, 14, 14)


def test_map_of_predicted_class_equals_hand_computed_cam():
    model = micro_cam()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    maps = hand_class_maps(model, x)
    logits = maps.mean(axis=(2, 3))
    with torch.no_grad():
        out = model(x)
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=1e-4, atol=1e-5)
    predicted = logits.argmax(1)
    for i in range(4):
        expected = hand_normalise(maps[i, predicted[i]])
        np.testing.assert_allclose(out.loc_map[i, 0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_map_of_given_target():
    model = micro_cam()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    maps = hand_class_maps(model, x)
    target = torch.tensor([5, 0, 2])
    with torch.no_grad():
        out = model(x, target=target)
        default = model(x)
    # The logits do not depend on which map is asked for.
    torch.testing.assert_close(out.logits, default.logits)
    for i, t in enumerate(target.tolist()):
        np.testing.assert_allclose(out.loc_map[i, 0].numpy(), hand_normalise(maps[i, t]), rtol=1e-4, atol=1e-5)
    # Another class's map differs from the predicted class's.
    predicted = default.logits.argmax(1)
    other = (predicted + 1) % 6
    with torch.no_grad():
        other_maps = model(x, target=other).loc_map
    assert (other_maps - default.loc_map).abs().flatten(1).max(1).values.min() > 1e-3


def test_normalize_cam_by_hand():
    cam = torch.tensor([[[[-1.0, 0.0], [2.0, 4.0]]], [[[-3.0, -2.0], [-1.0, -0.5]]]])
    out = normalize_cam(cam)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    # All-negative evidence: ReLU leaves nothing, the map is all zeros (not NaN).
    torch.testing.assert_close(out[1, 0], torch.zeros(2, 2))


def test_bad_images():
    model = micro_cam()
    with pytest.raises(ValueError, match="expected 64x64 images"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.zeros(1, 1, 64, 64))
