import os

import pytest
import torch

from dmdr.data.digits import DigitsBatches, from_unit, load_digits_tensors, to_unit

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_shapes_dtypes_ranges():
    x, y = load_digits_tensors("all")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    # sklearn's integer levels 0..16 map to k/16*2-1
    levels = torch.unique((x + 1) / 2 * 16)
    assert torch.allclose(levels, levels.round(), atol=1e-5)


def test_split_is_stratified_disjoint_and_deterministic():
    xa, ya = load_digits_tensors("all")
    xt, yt = load_digits_tensors("train")
    xh, yh = load_digits_tensors("holdout")
    assert len(yt) + len(yh) == len(ya) and len(yh) == 355
    for c in range(10):
        xc = xa[ya == c]
        assert torch.equal(xh[yh == c], xc[4::5])  # holdout = every 5th sample of the class, in data-set order
        keep = torch.ones(len(xc), dtype=torch.bool)
        keep[4::5] = False
        assert torch.equal(xt[yt == c], xc[keep])
    xh2, yh2 = load_digits_tensors("holdout")
    assert torch.equal(xh, xh2) and torch.equal(yh, yh2)


def test_returns_copies():
    x, _ = load_digits_tensors("all")
    x.zero_()
    assert load_digits_tensors("all")[0].abs().sum() > 0


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown digits split 'test'"):
        load_digits_tensors("test")


def test_unit_round_trip_and_clamp():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    assert torch.allclose(from_unit(to_unit(x)), x, atol=1e-15)
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]


def test_batches_shapes_and_membership():
    it = DigitsBatches(16, seed=0)
    x, y = next(it)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    xt, yt = load_digits_tensors("train")
    # every drawn image is a training image with its own label
    match = (x[:, None] == xt[None]).flatten(2).all(-1)
    assert match.any(1).all()
    assert all(y[i] in yt[match[i]] for i in range(16))


def test_batches_resume_gives_same_batches():
    a = DigitsBatches(8, seed=3, balanced=True)
    next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    b = DigitsBatches(8, seed=99, balanced=True)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [next(b) for _ in range(3)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsBatches(4, seed=0, balanced=True).load_state_dict(state)


def test_balanced_batches_are_class_uniform():
    x, y = next(DigitsBatches(5000, seed=0, balanced=True))
    counts = torch.bincount(y, minlength=10).float()
    assert (counts - 500).abs().max() < 80  # ~4.4 sigma of Binomial(5000, 0.1)
