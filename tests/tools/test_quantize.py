"""quantize._requantize rebuilds stored int8 weights exactly through torch's public quantize functions."""
from __future__ import annotations

import torch

from flan_rlhf.tools.quantize import _requantize


def test_per_tensor_int8_values_come_back_exactly_at_the_range_ends():
    int_repr = torch.tensor([[-128, -1, 0, 1, 127], [5, -77, 100, -100, 3]], dtype=torch.int8)
    for scale, zero_point in ((0.0123456789, 0), (3.3e-5, -7), (1.7, 12)):
        q = _requantize(int_repr, torch.tensor(scale, dtype=torch.float64), torch.tensor(zero_point), "per_tensor_affine", None)
        assert q.dtype == torch.qint8 and q.qscheme() == torch.per_tensor_affine
        assert torch.equal(q.int_repr(), int_repr) and q.q_zero_point() == zero_point
        assert abs(q.q_scale() - scale) < 1e-12


def test_per_channel_int8_values_come_back_exactly_along_the_axis():
    generator = torch.Generator().manual_seed(0)
    int_repr = torch.randint(-128, 128, (6, 9), generator=generator, dtype=torch.int8)
    int_repr[0, 0], int_repr[1, 1] = -128, 127
    scale = torch.rand(6, generator=generator, dtype=torch.float64) * 0.05 + 1e-5
    zero_point = torch.zeros(6, dtype=torch.int64)
    q = _requantize(int_repr, scale, zero_point, "per_channel_affine", 0)
    assert q.qscheme() == torch.per_channel_affine and q.q_per_channel_axis() == 0
    assert torch.equal(q.int_repr(), int_repr)
    torch.testing.assert_close(q.q_per_channel_scales(), scale, rtol=0, atol=1e-12)
