"""The head families, one module each, all built on `jheads.base`."""

from jheads.heads.binary import binary_classification_head
from jheads.heads.multi_class import multi_class_head
from jheads.heads.multi_label import multi_label_head
from jheads.heads.ranking import ranking_head
from jheads.heads.sequence import sequence_head
from jheads.heads.regression import (
    logistic_regression_head,
    poisson_regression_head,
    regression_head,
)

__all__ = [
    "binary_classification_head",
    "logistic_regression_head",
    "multi_class_head",
    "multi_label_head",
    "poisson_regression_head",
    "ranking_head",
    "regression_head",
    "sequence_head",
]
