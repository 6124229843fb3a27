"""Published SSL-ALPNet Dice (%) (ECCV'20 Table 1, identical in TMI'22), keyed by this project's names.

Keys are ``(dataset registry name, setting)``; organ names are the class names of ``dataloaders/datasets/*.json5``
(SABS ``KID_l``/``KID_R``, CHAOST2 ``LK``/``RK``, CMR ``LV_BP``/``LV_MYO``/``RV``). Values are 5-fold means, 1-way
"1-shot" (3 support slices), EP1-ALP (docs/method.md#published-numbers). Most per-organ values are unverified
against the paper PDF
([S]: from peer READMEs, consistent with the published means); the CT liver in setting 2 is 73.67 (FoB README).
"""

from __future__ import annotations

PUBLISHED_SSL_ALPNET: dict[tuple[str, int], dict[str, float]] = {
    ("SABS", 1): {"KID_l": 72.36, "KID_R": 71.81, "SPLEEN": 70.96, "LIVER": 78.29, "mean": 73.35},
    ("SABS", 2): {"KID_l": 63.34, "KID_R": 54.82, "SPLEEN": 60.25, "LIVER": 73.67, "mean": 63.02},
    ("CHAOST2", 1): {"LK": 81.92, "RK": 85.18, "SPLEEN": 72.18, "LIVER": 76.10, "mean": 78.84},
    ("CHAOST2", 2): {"LK": 73.63, "RK": 78.39, "SPLEEN": 67.02, "LIVER": 73.05, "mean": 73.02},
    ("CMR", 1): {"LV_BP": 83.99, "LV_MYO": 66.74, "RV": 79.96, "mean": 76.90},
}


def published(dataset: str, setting: int) -> dict[str, float]:
    """Published Dice (%) per organ (and ``mean``) for a dataset and setting; ``{}`` when none was published."""
    return dict(PUBLISHED_SSL_ALPNET.get((dataset, int(setting)), {}))
