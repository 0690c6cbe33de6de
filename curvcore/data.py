"""The digits data set (scikit-learn's ``load_digits``, 8x8 images, 10 classes).

Shipped with scikit-learn, so nothing is downloaded. A fixed stratified split
(80/20, ``random_state=0``) and standardisation with the training statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """Standardised float64 features and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(test_size: float = 0.2, seed: int = 0, standardize: bool = True) -> Split:
    """Load digits and split it (stratified) into train and test sets.

    Args:
        test_size: fraction held out for testing.
        seed: ``random_state`` of the split.
        standardize: subtract the training mean and divide by the training
            standard deviation (pixels constant in training keep scale 1).

    Returns:
        A :class:`Split` with ``x`` of shape (n, 64) and labels in 0..9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    if standardize:
        mean, std = x_tr.mean(0), x_tr.std(0)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Split(x_tr, y_tr, x_te, y_te)


def one_hot(y: np.ndarray, classes: int = 10) -> np.ndarray:
    """Float64 one-hot targets (for the MSE loss)."""
    return np.eye(classes)[y]
