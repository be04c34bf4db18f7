"""tritonadam: Adam, AdamW and AdaMax for PyTorch as multi-tensor Triton kernels."""
from .optim import Adam, AdaMax, Adamax, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "Adamax", "AdaMax", "__version__"]
