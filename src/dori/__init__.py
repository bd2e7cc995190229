"""dori: find and remove memorized training images in text-to-image diffusion models.

Implements the attack, mitigations, locality analyses and evaluation protocol of
*Finding Dori: Memorization in Text-to-Image Diffusion Models Is Not Local*.
"""

from dori.errors import DoriError

__version__ = "0.1.0"
__all__ = ["DoriError", "__version__"]
