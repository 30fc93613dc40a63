"""The data of the transfer study: a pretraining set and two new tasks with 1000 labels each.

* pretraining: Fashion-MNIST classes 0-4 (the Debian package ``dataset-fashion-mnist``),
* ``fmnist_5-9``: Fashion-MNIST classes 5-9; test: all 5000 test images of those classes,
* ``digits``: scikit-learn's 8x8 digits upsampled to 28 px; test: the samples not labelled.

As in VTAB-1k, a seed draws the labelled set (stratified); choosing anything (learning rate,
variant) uses a validation split carved from it (:meth:`Task.selection_split`, 800 / 200 by
default, stratified) and never reads the test images; the final runs train on all labelled
samples and are the only readers of the test split (:meth:`Task.final_split`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mosa_scale.data import load_builtin

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics
TASKS = ("fmnist_5-9", "digits")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, 28, 28)."""
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` positions of every class of ``labels``, drawn without replacement, shuffled.

    Raises:
        ValueError: a class has fewer than ``per_class`` samples.
    """
    picks = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        if len(where) < per_class:
            raise ValueError(f"class {c} has {len(where)} samples; {per_class} per class were asked for")
        picks.append(rng.choice(where, per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, 1, 28, 28) float and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    """A transfer task: a pool to draw labelled samples from and a test set.

    Attributes:
        name: Task name (a key of :data:`TASKS`).
        pool_images, pool_labels: uint8 (P, H, W) and int64 (P,) labels 0..C-1.
        test_images, test_labels: The test set; None: the pool samples not labelled (digits).
        labelled: Labelled samples per seed (divided evenly over the classes).
        val_fraction: Share of every class's labelled samples held out for validation.
    """

    name: str
    pool_images: np.ndarray
    pool_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    labelled: int = 1000
    val_fraction: float = 0.2

    @property
    def num_classes(self) -> int:
        return int(self.pool_labels.max()) + 1

    def _labelled(self, seed: int) -> np.ndarray:
        return stratified(self.pool_labels, self.labelled // self.num_classes, np.random.default_rng(seed))

    def selection_split(self, seed: int) -> tuple[Split, Split]:
        """(train, validation) carved from the labelled samples of ``seed``, stratified; reads no
        test image."""
        idx = self._labelled(seed)
        labels = self.pool_labels[idx]
        per_class = round(self.labelled // self.num_classes * self.val_fraction)
        val_pos = stratified(labels, per_class, np.random.default_rng([seed, 1]))
        train_pos = np.setdiff1d(np.arange(len(idx)), val_pos)
        return self._split(idx[train_pos]), self._split(idx[np.sort(val_pos)])

    def final_split(self, seed: int) -> tuple[Split, Split]:
        """(all labelled samples of ``seed``, the test split)."""
        idx = self._labelled(seed)
        if self.test_images is None:  # the pool samples not drawn for training
            rest = np.setdiff1d(np.arange(len(self.pool_labels)), idx)
            return self._split(idx), self._split(rest)
        return self._split(idx), Split(to_tensor(self.test_images), torch.from_numpy(self.test_labels))

    def _split(self, idx: np.ndarray) -> Split:
        return Split(to_tensor(self.pool_images[idx]), torch.from_numpy(self.pool_labels[idx]))


def load_tasks(
    names: tuple[str, ...] = TASKS,
    *,
    labelled: int = 1000,
    val_fraction: float = 0.2,
    pretrain_samples: int | None = None,
) -> tuple[Split, Split, dict[str, Task]]:
    """The pretraining train and test splits (Fashion-MNIST 0-4) and the named tasks.

    Args:
        names: Tasks to load (from :data:`TASKS`).
        labelled: Labelled samples per task and seed.
        val_fraction: Share of them held out for validation while choosing.
        pretrain_samples: Use only the first this many pretraining images (None: all 30,000).

    Raises:
        ValueError: an unknown task name.
        mosa_scale.data.MissingDatasetError: Fashion-MNIST is not installed (the error says how).
    """
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; allowed: {', '.join(TASKS)}")
    fm = load_builtin("fashion-mnist")
    x, y = fm.images, fm.labels
    xtr, ytr, xte, yte = x[:60000], y[:60000], x[60000:], y[60000:]
    lo_tr, lo_te = ytr < 5, yte < 5
    px, py = xtr[lo_tr][:pretrain_samples], ytr[lo_tr][:pretrain_samples]
    pre_train = Split(to_tensor(px), torch.from_numpy(py))
    pre_test = Split(to_tensor(xte[lo_te]), torch.from_numpy(yte[lo_te]))
    tasks = {}
    if "fmnist_5-9" in names:
        tasks["fmnist_5-9"] = Task(
            "fmnist_5-9", xtr[~lo_tr], ytr[~lo_tr] - 5, xte[~lo_te], yte[~lo_te] - 5, labelled, val_fraction
        )
    if "digits" in names:
        digits = load_builtin("digits")
        tasks["digits"] = Task("digits", digits.images, digits.labels, None, None, labelled, val_fraction)
    return pre_train, pre_test, {n: tasks[n] for n in names}
