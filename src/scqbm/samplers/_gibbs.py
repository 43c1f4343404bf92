"""Native PyTorch Gibbs sampler with persistent chains (PCD, Tieleman 2008)."""

from __future__ import annotations

import torch

from scqbm.prior import gibbs_sweep

from ._base import BoltzmannSampler, check_chain_settings


class GibbsSampler(BoltzmannSampler):
    """Persistent Gibbs chains: block updates for an RBM, systematic single-site scans otherwise.

    The chains live in the buffer ``state``; each call that asks for ``num_chains`` reads
    advances them by ``num_sweeps`` sweeps and returns them (persistent contrastive
    divergence). A call for another number of reads runs fresh chains for ``burn_in +
    num_sweeps`` sweeps without touching the persistent state, which is how the model's
    query methods sample without changing training state.

    Parameters
    ----------
    n_units
        Number of binary units (fixes the buffer's shape, so saved models load strictly).
    num_chains
        Number of persistent chains (the negative-phase batch).
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
        check_chain_settings("GibbsSampler", num_chains, num_sweeps, burn_in)
        self.n_units = n_units
        self.num_chains = num_chains
        self.num_sweeps = num_sweeps
        self.burn_in = burn_in
        self.seed = seed
        self.persistent = persistent
        self.register_buffer("state", torch.zeros(num_chains, n_units))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._generator: torch.Generator | None = None

    def _run(self, z, h, W, n_visible, sweeps, generator):
        for _ in range(sweeps):
            z = gibbs_sweep(z, h, W, n_visible, generator=generator)
        return z

    def _sample(self, h, W, num_reads, n_visible):
        generator = self._rng(h.device)
        persistent = (
            self.persistent and num_reads == self.num_chains and h.shape[0] == self.n_units
        )
        if not persistent:
            z = torch.rand(
                num_reads, h.shape[0], generator=generator, device=h.device, dtype=h.dtype
            )
            z = self._run(z.round(), h, W, n_visible, self.burn_in + self.num_sweeps, generator)
            return z, {"persistent": False, "sweeps": self.burn_in + self.num_sweeps}
        sweeps = self.num_sweeps
        z = self.state.to(h.dtype)
        if not bool(self.initialized):
            z = torch.rand(z.shape, generator=generator, device=h.device, dtype=h.dtype).round()
            sweeps += self.burn_in
        z = self._run(z, h, W, n_visible, sweeps, generator)
        # In place: rebinding a buffer inside inference mode breaks later backward passes.
        self.state.copy_(z)
        self.initialized.fill_(True)
        return z.clone(), {"persistent": True, "sweeps": sweeps}

    def reset(self) -> None:
        """Forget the persistent chains (they are re-initialised and burnt in on next use)."""
        self.initialized.fill_(False)

    def extra_repr(self) -> str:
        return (
            f"n_units={self.n_units}, num_chains={self.num_chains}, "
            f"num_sweeps={self.num_sweeps}, burn_in={self.burn_in}"
        )
