"""Shared test helpers."""

import numpy as np


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity measure used throughout (goal <= 1e-5 in fp32)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
