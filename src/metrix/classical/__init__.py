"""Classical (linear) metric learning with the scikit-learn estimator API.

Each learner finds ``L`` (``components_``) so that ``d(x, y) = ||Lx − Ly||``, ``M = LᵀL ⪰ 0``.
NumPy in, NumPy out; heavy iterations run on torch matrices.
"""

from metrix.classical._base import MahalanobisDistance, MahalanobisLearner
from metrix.classical._constraints import (
    pair_indices_from_labels,
    pairs_from_labels,
    triplet_indices_from_labels,
)
from metrix.classical.covariance import Covariance
from metrix.classical.itml import ITML
from metrix.classical.lmnn import LMNN
from metrix.classical.mlkr import MLKR
from metrix.classical.mmc import MMC
from metrix.classical.nca import NCA
from metrix.classical.persistence import load_estimator, save_estimator
from metrix.classical.rca import RCA
from metrix.classical.spectral import FDA, LFDA

ESTIMATORS = {cls.__name__: cls for cls in (Covariance, NCA, LMNN, ITML, MMC, LFDA, FDA, RCA, MLKR)}

__all__ = [
    "Covariance", "NCA", "LMNN", "ITML", "MMC", "LFDA", "FDA", "RCA", "MLKR", "ESTIMATORS",
    "MahalanobisDistance", "MahalanobisLearner", "load_estimator", "save_estimator",
    "pair_indices_from_labels", "pairs_from_labels", "triplet_indices_from_labels",
]
