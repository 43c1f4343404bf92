from ._qbmvae import QBMVAEModule

__all__ = ["QBMVAEModule"]
