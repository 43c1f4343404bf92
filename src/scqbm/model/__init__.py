from ._qbmvae import QBMVAE

__all__ = ["QBMVAE"]
