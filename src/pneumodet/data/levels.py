"""The four augmentation levels of Gabruseva et al. (2020) as data: the distributions each level draws its
parameters from. Pure data (no numpy, no OpenCV), so that configs and the command line can name and check
levels without loading the image code; :mod:`pneumodet.data.augment` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["LEVELS", "LEVEL_SPECS", "LevelSpec"]


@dataclass(frozen=True)
class LevelSpec:
    """The distributions one augmentation level draws its parameters from.

    Gaussian parameters are zero-mean with the given standard deviation; ``max_*`` parameters are
    uniform on ``[0, max]`` (shift: on ``[-max, max]``); ``*_p`` are per-image probabilities.
    """

    log2_scale_std: float = 0.0  # scale = 2 ** N(0, std), drawn for x and y separately
    rotation_std: float = 0.0  # degrees
    shear_std: float = 0.0  # degrees
    max_shift: float = 0.0  # fraction of the output side, per axis
    flip_p: float = 0.0
    log2_gamma_std: float = 0.0  # gamma = 2 ** N(0, std)
    salt_pepper_p: float = 0.0
    salt_pepper_fraction: float = 0.01  # fraction of coarse cells replaced
    salt_pepper_cells: tuple[float, float] = (0.1, 0.2)  # coarse grid side, fraction of the image side
    blur_p: float = 0.0
    max_blur_sigma: float = 0.0  # pixels
    noise_p: float = 0.0
    max_noise_sigma: float = 0.0  # grey levels (0-255)

    @property
    def is_identity(self) -> bool:
        """True when the level only resizes (no random parameter at all)."""
        return self == LevelSpec()


_LIGHT = LevelSpec(log2_scale_std=0.1, rotation_std=5.0, shear_std=2.5, max_shift=0.06, log2_gamma_std=0.2)
_HEAVY = LevelSpec(
    log2_scale_std=0.15, shear_std=4.0, max_shift=0.06, flip_p=0.5, log2_gamma_std=0.25,
    salt_pepper_p=0.1, blur_p=0.5, max_blur_sigma=2.0, noise_p=0.5, max_noise_sigma=0.04 * 255,
)

#: The levels by name, weakest first. Validation, test and prediction always use ``resize_only``.
LEVEL_SPECS: dict[str, LevelSpec] = {
    "resize_only": LevelSpec(),
    "light": _LIGHT,
    "heavy": _HEAVY,
    "heavy_with_rotations": replace(_HEAVY, rotation_std=6.0),
}
LEVELS: tuple[str, ...] = tuple(LEVEL_SPECS)
