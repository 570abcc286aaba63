"""3D post-processing that uses what the user painted: predictions must connect to the painted structure.

The few-shot decoder judges each slice on its own, so it can fire on look-alike tissue far from the
structure (a blob on a slice the organ never reaches). A voxel the user painted is certain; a predicted
region that is not connected in 3D to any painted voxel of the same label is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def keep_components_linked_to_painted(
    labels: np.ndarray, painted: np.ndarray, painted_indices: Sequence[int]
) -> np.ndarray:
    """Keep, per label, the 3D connected components (6-connectivity) that contain a painted voxel.

    Args:
        labels: (N, rows, cols) predicted label stack, slices along axis 0, painted slices already pasted in.
        painted: (N, rows, cols) the user's label stack (non-zero only on ``painted_indices``).
    """
    result = np.zeros_like(labels)
    painted_only = np.zeros_like(painted)
    painted_only[list(painted_indices)] = painted[list(painted_indices)]
    for value in np.unique(labels[labels != 0]):
        components, _ = ndimage.label(labels == value)
        linked = np.unique(components[(painted_only == value) & (components > 0)])
        result[np.isin(components, linked[linked > 0])] = value
    return result
