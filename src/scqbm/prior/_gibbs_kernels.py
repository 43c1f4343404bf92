"""Gibbs transition kernels for Boltzmann machines over {0, 1}^n.

The conditional of unit ``i`` under ``E(z) = -h.z - z'Wz`` (``W`` symmetric, zero diagonal) is
``p(z_i = 1 | z_-i) = sigmoid(h_i + 2 (W z)_i)``. Both kernels leave the Boltzmann distribution
invariant; ``field_scale`` and ``coupling_scale`` multiply ``h`` and ``W`` so the same kernels
serve annealed importance sampling (``coupling_scale = beta``) and tempering (both ``= beta``).
Scales may be floats or tensors of shape ``(n_chains, 1)`` (one temperature per chain).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def sample_bernoulli(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Independent Bernoulli draws with the given logits (one uniform per unit)."""
    uniform = torch.rand(
        logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
    )
    return (uniform < torch.sigmoid(logits)).to(logits.dtype)


@functools.cache
def _numba_dense_sweep():
    """Compiled single-site sweep for CPU tensors, or ``None`` without numba.

    A dense sweep is ``n`` dependent updates; in torch each costs several op dispatches
    (~100 us on a CPU), which made AIS and dense-prior sampling dominate training. The
    compiled loop does the same arithmetic with the same random numbers.
    """
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with scanpy
        return None

    @numba.njit(cache=True, nogil=True)
    def sweep(z, local, thresholds, W, coupling, order):  # pragma: no cover - compiled
        n_chains = z.shape[0]
        n = z.shape[1]
        for c in range(n_chains):
            for k in range(order.shape[0]):
                i = order[k]
                new = 1.0 if local[c, i] > thresholds[c, i] else 0.0
                delta = new - z[c, i]
                if delta != 0.0:
                    z[c, i] = new
                    step = coupling[c] * delta
                    for j in range(n):
                        local[c, j] += step * W[i, j]

    return sweep


@functools.cache
def _numba_block_scan():
    """Compiled in-block scan of the blocked sweep, or ``None`` without numba.

    Arrays are transposed, ``(block, n_chains)``, so that the inner loops run over chains
    (contiguous, vectorised). ``local`` holds the fields of the block's units given the chain
    state at the start of the block; each unit is updated from its field, and its change is
    added to the fields of the block's *later* units only (the earlier ones are done).
    """
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with scanpy
        return None

    @numba.njit(cache=True, nogil=True)
    def scan(z, local, thresholds, W_block, coupling):  # pragma: no cover - compiled
        b, n_chains = z.shape
        step = np.empty(n_chains, dtype=z.dtype)
        for i in range(b):
            for c in range(n_chains):
                new = 1.0 if local[i, c] > thresholds[i, c] else 0.0
                step[c] = coupling[c] * (new - z[i, c])
                z[i, c] = new
            for j in range(i + 1, b):
                w = W_block[i, j]
                for c in range(n_chains):
                    local[j, c] += w * step[c]

    return scan


#: Units per block of the blocked dense sweep: wide enough for efficient matrix products,
#: narrow enough that the sequential in-block scan (``O(n_chains * n * block)``) stays small.
DENSE_BLOCK_SIZE = 64


def dense_gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    order: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    compiled: bool | None = None,
    scheme: str = "blocked",
    block_size: int | None = None,
) -> torch.Tensor:
    """One systematic-scan Gibbs sweep of a dense Boltzmann machine, all chains in parallel.

    Units are updated one at a time (a synchronous update of all units is not a Gibbs sampler
    for a dense coupling matrix), each from its exact conditional given the current values of
    all others, so every update leaves ``exp(-E)`` invariant.

    Two evaluations of the *same* Markov kernel (same scan order, same random numbers, equal
    results up to floating-point rounding):

    * ``scheme="blocked"`` (default): the scan is cut into blocks of ``block_size`` units.
      At the start of a block the fields of its units are computed from the current state
      with one matrix product (``z @ W[:, block]``, BLAS); within the block the units are
      scanned one at a time and a flip updates only the fields of the block's later units.
      A sweep costs one ``(n_chains, n) x (n, n)`` product plus ``O(n_chains * n * block)``
      sequential work.
    * ``scheme="single_site"``: the fields of all units are kept up to date after every flip
      (``O(n_chains * n)`` per flip); cheaper when few units flip, slower otherwise.

    Parameters
    ----------
    z
        Chain states, shape ``(n_chains, n)``, values in {0, 1}. Not modified.
    h, W
        Fields ``(n,)`` and symmetric zero-diagonal couplings ``(n, n)``.
    field_scale, coupling_scale
        Multipliers of ``h`` and ``W`` (inverse temperatures).
    order
        Update order (a permutation of ``range(n)``); defaults to ``0 .. n-1``.
    generator
        Random generator for reproducibility.
    compiled
        Use the numba kernels (default: for CPU tensors when numba is importable). Both paths
        consume the same random numbers and give the same result.
    scheme
        ``"blocked"`` or ``"single_site"`` (see above).
    block_size
        Units per block of the blocked scheme (default ``DENSE_BLOCK_SIZE``).

    Returns
    -------
    New chain states, shape ``(n_chains, n)``.

    """
    if scheme not in ("blocked", "single_site"):
        raise ValueError(f"`scheme` must be 'blocked' or 'single_site', got {scheme!r}.")
    n_chains, n = z.shape
    h, W = h.detach(), W.detach()
    coupling = 2.0 * coupling_scale
    # Unit i turns on iff its local field exceeds logit(u): the same draw as u < sigmoid(field).
    uniform = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    thresholds = torch.logit(uniform)
    use_numba = compiled is not False and z.device.type == "cpu"
    if scheme == "blocked":
        return _blocked_sweep(
            z, h, W, field_scale, coupling, order, thresholds, use_numba, block_size
        )
    local = field_scale * h + coupling * (z @ W)  # (n_chains, n)
    order = torch.arange(n, device=z.device) if order is None else order
    kernel = _numba_dense_sweep() if use_numba else None
    if kernel is not None:
        z_np = z.detach().to(torch.float64).numpy().copy()
        local_np = local.detach().to(torch.float64).numpy().copy()
        per_chain = torch.as_tensor(coupling, dtype=torch.float64).expand(n_chains, 1)
        kernel(
            z_np,
            local_np,
            thresholds.detach().to(torch.float64).numpy(),
            W.detach().to(torch.float64).numpy(),
            per_chain.reshape(-1).contiguous().numpy(),
            order.cpu().numpy().astype(np.int64),
        )
        return torch.from_numpy(z_np).to(z.dtype)
    z = z.clone()
    for i in order.tolist():
        new = (local[:, i] > thresholds[:, i]).to(z.dtype)
        delta = new - z[:, i]
        z[:, i] = new
        local = local + coupling * delta.unsqueeze(-1) * W[i]
    return z


def _per_chain_row(scale, n_chains, dtype, device):
    """A scalar or ``(n_chains, 1)`` scale as a float, a 0-d tensor or a ``(1, n_chains)`` row.

    Tensors stay tensors (no ``float()``): reading a device scalar on the host would stall a
    GPU on every sweep.
    """
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    scale = scale.to(device=device, dtype=dtype)
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(1, n_chains)


def _blocked_sweep(z, h, W, field_scale, coupling, order, thresholds, use_numba, block_size):
    """The blocked evaluation of the systematic scan (see :func:`dense_gibbs_sweep`).

    Works on transposed states ``(n, n_chains)``: a block is then a set of contiguous rows,
    its fields one matrix product, and the in-block updates run over contiguous chains.
    """
    n_chains, n = z.shape
    block = DENSE_BLOCK_SIZE if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size}.")
    if order is not None:
        # Scan in the given order: relabel the units so that the order is 0 .. n-1.
        order = order.to(device=z.device, dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=z.device)
        z, h, thresholds = z[:, order], h[order], thresholds[:, order]
        W = W[order][:, order]
    z_t = z.detach().T.contiguous()  # (n, n_chains)
    thr_t = thresholds.T.contiguous()
    field_scale = _per_chain_row(field_scale, n_chains, z.dtype, z.device)
    coupling = _per_chain_row(coupling, n_chains, z.dtype, z.device)
    kernel = _numba_block_scan() if use_numba else None
    if kernel is not None:
        per_chain = torch.as_tensor(coupling, dtype=z.dtype).expand(1, n_chains)
        per_chain = per_chain.reshape(-1).contiguous().numpy()
    for start in range(0, n, block):
        stop = min(start + block, n)
        # Fields of the block's units given every unit's current value (earlier blocks done):
        # field_j = h_j + 2 sum_i z_i W_ij, so the block's rows are W[:, block]' z.
        local = field_scale * h[start:stop, None] + coupling * (W[:, start:stop].T @ z_t)
        W_block = W[start:stop, start:stop]
        if kernel is not None:
            kernel(
                z_t[start:stop].numpy(),
                local.numpy(),
                thr_t[start:stop].numpy(),
                W_block.contiguous().numpy(),
                per_chain,
            )
            continue
        for i in range(stop - start):
            row = start + i
            new = (local[i] > thr_t[row]).to(z.dtype)
            step = coupling * (new - z_t[row])
            z_t[row] = new
            local[i + 1 :] += W_block[i, i + 1 :, None] * step
    z = z_t.T.contiguous()
    if order is not None:
        z = z[:, inverse]
    return z


def bipartite_gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One block Gibbs sweep of a restricted Boltzmann machine (hidden block, then visible).

    Units ``[0, n_visible)`` form one side and ``[n_visible, n)`` the other; ``W`` has non-zero
    entries only between the sides, so each side is conditionally independent given the other.
    """
    B = W[:n_visible, n_visible:]
    visible, hidden = bipartite_half_sweeps(
        z[:, :n_visible] @ B,
        h,
        B,
        field_scale=field_scale,
        coupling_scale=coupling_scale,
        generator=generator,
    )
    return torch.cat([visible, hidden], dim=-1)


def bipartite_half_sweeps(
    visible_fields: torch.Tensor,
    h: torch.Tensor,
    B: torch.Tensor,
    *,
    field_scale: float | torch.Tensor = 1.0,
    coupling_scale: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two block updates of an RBM sweep, given the visible side's product ``v @ B``.

    Returns the new ``(visible, hidden)`` sides. Taking the product rather than ``v`` lets
    AIS reuse it for its weight (:func:`~scqbm.prior.ais_log_partition`).
    """
    n_visible = B.shape[0]
    coupling = 2.0 * coupling_scale
    hidden = sample_bernoulli(field_scale * h[n_visible:] + coupling * visible_fields, generator)
    visible = sample_bernoulli(field_scale * h[:n_visible] + coupling * (hidden @ B.T), generator)
    return visible, hidden


def gibbs_sweep(
    z: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    n_visible: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dispatch to the block kernel for bipartite couplings, else the dense kernel."""
    if n_visible is None:
        return dense_gibbs_sweep(z, h, W, **kwargs)
    kwargs.pop("order", None)
    return bipartite_gibbs_sweep(z, h, W, n_visible, **kwargs)
