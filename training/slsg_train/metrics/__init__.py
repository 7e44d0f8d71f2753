"""LOCO metrics: image AUROC by anomaly type, sPRO / AU-sPRO and pixel AUROC (numpy only, no torch)."""

from slsg_train.metrics.pixel import PixelROC, pixel_auroc
from slsg_train.metrics.roc import (
    auroc, auroc_from_counts, image_auroc_by_defect, image_auroc_by_type, roc_curve, type_key,
)
from slsg_train.metrics.spro import (
    AU_SPRO_LIMITS, ImageMaps, SPROByType, SPROCurve, au_spro, au_spro_by_type, au_spro_error_bound,
    saturation_area, spro_curve,
)

__all__ = [
    "AU_SPRO_LIMITS", "ImageMaps", "PixelROC", "SPROByType", "SPROCurve", "au_spro", "au_spro_by_type",
    "au_spro_error_bound", "auroc", "auroc_from_counts", "image_auroc_by_defect", "image_auroc_by_type", "pixel_auroc",
    "roc_curve",
    "saturation_area", "spro_curve", "type_key",
]
