"""Augmentation constants shared by the DALI graphs and the torch baseline.

The values are those of the ImageNet recipes ReLabel trains with: channel statistics on a 0..1
scale, and the AlexNet-style PCA lighting basis (eigenvector ``i`` is column ``i``).
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# Lighting adds PCA_BASIS @ alpha (0..1 scale), alpha ~ N(0, LIGHTING_STD): eigenvectors scaled by eigenvalues.
PCA_BASIS = tuple(tuple(PCA_EIGVEC[c][j] * PCA_EIGVAL[j] for j in range(3)) for c in range(3))
LIGHTING_STD = 0.1
COLOR_JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - 0.4, 1 + 0.4]
# The grey that contrast and saturation blend towards (ITU-R 601 luma, as PIL's "L" conversion).
# The weights sum to 1, which is what lets the three jitter steps compose in any order (PIPELINE.md).
GREY_WEIGHTS = (0.299, 0.587, 0.114)

RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT_RATIO = (3 / 4, 4 / 3)
VAL_CROP_RATIO = 0.875
