"""Metric-learning losses. Every loss is a pure function plus a thin ``nn.Module`` wrapper,
called as ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None)`` → scalar."""

from metrix.losses._common import Pairs, release_scratch
from metrix.losses.circle import CircleLoss, circle_loss
from metrix.losses.combined import MultipleLosses
from metrix.losses.contrastive import ContrastiveLoss, contrastive_loss
from metrix.losses.lifted import (
    GeneralizedLiftedStructureLoss,
    LiftedStructureLoss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
)
from metrix.losses.margin import MarginLoss
from metrix.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from metrix.losses.nca import NCALoss, nca_loss
from metrix.losses.npair import InfoNCELoss, NPairLoss, info_nce_loss, npair_loss
from metrix.losses.ntxent import NTXentLoss, ntxent_loss
from metrix.losses.per_positive import AngularLoss, SmoothAPLoss, angular_loss, smooth_ap_loss
from metrix.losses.proxies import (
    ArcFaceLoss,
    CenterLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    arcface_loss,
    center_loss,
    cosface_loss,
    large_margin_softmax_loss,
    normalized_softmax_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    softtriple_loss,
    sphereface_loss,
    subcenter_arcface_loss,
)
from metrix.losses.ranking import (
    NegativeSamplingLoss,
    RankingLoss,
    listmle_loss,
    listnet_loss,
    negative_sampling_loss,
    pairwise_margin_loss,
    pointwise_loss,
    ranknet_loss,
)
from metrix.losses.triplet import TRIPLET_SELECTIONS, TripletMarginLoss, triplet_margin_loss

# name -> (class, needs num_classes/embedding_dim)
LOSSES = {
    "contrastive": (ContrastiveLoss, False),
    "triplet": (TripletMarginLoss, False),
    "multi_similarity": (MultiSimilarityLoss, False),
    "ntxent": (NTXentLoss, False),
    "arcface": (ArcFaceLoss, True),
    "cosface": (CosFaceLoss, True),
    "proxy_anchor": (ProxyAnchorLoss, True),
    "circle": (CircleLoss, False),
    "generalized_lifted": (GeneralizedLiftedStructureLoss, False),
    "proxy_nca": (ProxyNCALoss, True),
    "normalized_softmax": (NormalizedSoftmaxLoss, True),
    "lifted_structure": (LiftedStructureLoss, False),
    "npair": (NPairLoss, False),
    "center": (CenterLoss, True),
    "nca": (NCALoss, False),
    "subcenter_arcface": (SubCenterArcFaceLoss, True),
    "softtriple": (SoftTripleLoss, True),
    "large_margin_softmax": (LargeMarginSoftmaxLoss, True),
    "sphereface": (SphereFaceLoss, True),
    "margin": (MarginLoss, False),
    "angular": (AngularLoss, False),
    "smooth_ap": (SmoothAPLoss, False),
}


def build_loss(name: str, num_classes: int | None = None, embedding_dim: int | None = None, **kwargs):
    """Build a loss by name; proxy/classification losses also need ``num_classes`` and ``embedding_dim``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    cls, needs_classes = LOSSES[name]
    if needs_classes:
        if num_classes is None or embedding_dim is None:
            raise ValueError(f"loss {name!r} needs num_classes and embedding_dim")
        return cls(num_classes, embedding_dim, **kwargs)
    return cls(**kwargs)


__all__ = [
    "AngularLoss", "SmoothAPLoss", "angular_loss", "smooth_ap_loss",
    "NegativeSamplingLoss", "RankingLoss", "listmle_loss", "listnet_loss", "negative_sampling_loss",
    "pairwise_margin_loss", "pointwise_loss", "ranknet_loss",
    "LargeMarginSoftmaxLoss", "MarginLoss", "SphereFaceLoss", "large_margin_softmax_loss", "sphereface_loss",
    "NCALoss", "SoftTripleLoss", "SubCenterArcFaceLoss", "nca_loss", "softtriple_loss", "subcenter_arcface_loss",
    "CenterLoss", "InfoNCELoss", "LiftedStructureLoss", "NPairLoss", "center_loss", "info_nce_loss",
    "lifted_structure_loss", "npair_loss",
    "ArcFaceLoss", "CircleLoss", "ContrastiveLoss", "CosFaceLoss", "GeneralizedLiftedStructureLoss", "LOSSES",
    "MultiSimilarityLoss", "MultipleLosses", "NTXentLoss", "NormalizedSoftmaxLoss", "Pairs", "ProxyAnchorLoss", "release_scratch",
    "ProxyNCALoss", "TRIPLET_SELECTIONS", "TripletMarginLoss", "arcface_loss", "build_loss", "circle_loss",
    "contrastive_loss", "cosface_loss", "generalized_lifted_structure_loss", "multi_similarity_loss",
    "normalized_softmax_loss", "ntxent_loss", "proxy_anchor_loss", "proxy_nca_loss", "triplet_margin_loss",
]
