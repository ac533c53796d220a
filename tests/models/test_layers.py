"""The shared padding helper: zero padding, masks, target dtype and device, empty rows."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.models.layers import masked_mean, pad_sequences


def test_pad_sequences_zero_pads_and_masks_each_row():
    rows = [torch.ones(2, 3), torch.full((4, 3), 2.0), torch.zeros(0, 3)]
    features, mask = pad_sequences(rows)
    assert features.shape == (3, 4, 3) and features.dtype == torch.float32
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert features[0, 2:].abs().sum() == 0 and torch.equal(features[1], rows[1])
    torch.testing.assert_close(masked_mean(features[:2], mask[:2]), torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_pad_sequences_casts_to_the_requested_dtype():
    rows = [torch.randn(5, 4).half(), torch.randn(3, 4).half()]
    features, mask = pad_sequences(rows, dtype=torch.float32, device="cpu")
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    torch.testing.assert_close(features[1, :3], rows[1].float())
    assert pad_sequences([torch.zeros(0, 4)])[0].shape == (1, 1, 4)
    with pytest.raises(ValueError, match="zero rows"):
        pad_sequences([])
