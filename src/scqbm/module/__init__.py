from ._qbmscanvae import QBMSCANVAEModule
from ._qbmvae import QBMVAEModule

__all__ = ["QBMSCANVAEModule", "QBMVAEModule"]
