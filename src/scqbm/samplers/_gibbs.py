"""Native PyTorch Gibbs sampler with persistent chains (PCD, Tieleman 2008)."""

from __future__ import annotations

from scqbm.prior import gibbs_sweep

from ._base import PersistentChainSampler


class GibbsSampler(PersistentChainSampler):
    """Persistent Gibbs chains: block updates for an RBM, systematic single-site scans otherwise.

    The chains live in the buffer ``state`` (see
    :class:`~scqbm.samplers.PersistentChainSampler`); each call that asks for ``num_chains``
    reads advances them by ``num_sweeps`` sweeps and returns them (persistent contrastive
    divergence). A call for another number of reads runs fresh chains for ``burn_in +
    num_sweeps`` sweeps without touching the persistent state.

    Parameters
    ----------
    n_units
        Number of binary units (fixes the buffer's shape, so saved models load strictly).
    num_chains
        Number of persistent chains: the declared negative samples per training step
        (``properties["num_reads"]``).
    num_sweeps
        Sweeps per call for the persistent chains.
    burn_in
        Sweeps before the first use of the persistent chains and for fresh chains.
    seed
        Seed of the sampler's own random generator (``None``: torch's global generator).
    persistent
        ``False``: every call runs fresh chains (a stand-alone sampler).

    """

    name = "gibbs"

    def __init__(
        self,
        n_units: int,
        num_chains: int = 512,
        num_sweeps: int = 1,
        burn_in: int = 100,
        seed: int | None = None,
        persistent: bool = True,
    ):
        super().__init__()
        self._init_chains(n_units, num_chains, num_sweeps, burn_in, seed, persistent)

    def _advance(self, z, h, W, n_visible, sweeps, generator, persistent):
        for _ in range(sweeps):
            z = gibbs_sweep(z, h, W, n_visible, generator=generator)
        return z, z, {}

    def extra_repr(self) -> str:
        return (
            f"n_units={self.n_units}, num_chains={self.num_chains}, "
            f"num_sweeps={self.num_sweeps}, burn_in={self.burn_in}"
        )
