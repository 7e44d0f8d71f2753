"""Data: the MVTec LOCO AD reader and the synthetic LOCO-style data set (numpy + Pillow, no torch)."""

from slsg_train.data.loco import (
    DataSetError, DefectConfig, DefectMask, LocoCategory, TestSample, list_categories, load_rgb,
)

__all__ = ["DataSetError", "DefectConfig", "DefectMask", "LocoCategory", "TestSample", "list_categories", "load_rgb"]
