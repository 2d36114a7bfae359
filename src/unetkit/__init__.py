"""unetkit: the U-Net of Ronneberger, Fischer & Brox (2015) as a toolkit.

Train a U-Net from a handful of annotated images, segment images of any size seamlessly with
overlap-tile prediction, and score results with the challenges' own metrics.

Example:
    >>> import numpy as np, unetkit
    >>> net = unetkit.UNet(depth=3, base_channels=4).eval()
    >>> unetkit.predict(net, np.zeros((50, 70), np.float32)).shape
    (2, 50, 70)
"""

from .config import PAPER, PaperDefaults
from .errors import InputError
from .geometry import Geometry
from .network import UNet
from .predict import predict

__all__ = ["PAPER", "PaperDefaults", "InputError", "Geometry", "UNet", "predict"]
__version__ = "0.1.0"
