"""QBMVAEModule: scVI's encoder/decoder around a binary latent with a Boltzmann prior."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module import VAE
from scvi.module._constants import MODULE_KEYS
from scvi.module.base import LossOutput, auto_move_data
from torch.distributions import Normal

from scqbm.nn import BernoulliEncoder, bernoulli_entropy, make_relaxation
from scqbm.prior import BoltzmannPrior, LatentTooLargeError, LogPartitionEstimate
from scqbm.samplers import SampleSet, make_sampler


class QBMVAEModule(VAE):
    """Variational autoencoder with binary latents and a Boltzmann-machine prior (QBM-VAE).

    Everything outside the latent is scVI's :class:`~scvi.module.VAE` (library size, batch and
    covariate conditioning of the ``FCLayers`` encoder trunk and of ``DecoderSCVI``,
    likelihoods). The latent differs:

    * ``q(z|x)`` is a factorial Bernoulli with logits from :class:`~scqbm.nn.BernoulliEncoder`;
      the decoder sees a relaxed sample ``zeta`` in [0, 1]^n (``relaxation``, ``beta``).
    * ``p(z) = exp(-E(z)) / Z`` with ``E(z) = -h.z - z'Wz`` (:class:`~scqbm.prior.BoltzmannPrior`).
    * ``KL(q||p) = -H(q) + E_q[E(z)] + log Z``; the first two terms are exact for a factorial
      ``q``. The gradient of ``log Z`` is ``-E_p[dE/dtheta]``, estimated from negative-phase
      samples handed to :meth:`loss` by the training plan; the *value* of ``log Z`` in the
      reported KL comes from :meth:`refresh_log_partition` (exact or AIS).

    Parameters
    ----------
    n_input, n_batch, n_labels, n_hidden, n_latent, n_layers, dropout_rate, ...
        As in :class:`~scvi.module.VAE` (``n_latent`` is the number of binary units).
    prior
        ``"rbm"`` (bipartite) or ``"bm"`` (fully connected).
    n_visible
        First-side size of the RBM prior (default ``n_latent // 2``).
    relaxation
        ``"spike_exp"`` (Rolfe 2016) or ``"overlapping_exp"`` (DVAE++).
    beta
        Sharpness of the relaxation.
    sampler, sampler_kwargs
        Negative-phase backend by name (see :func:`scqbm.samplers.available_samplers`).
    log_partition
        How the value of log Z is estimated: ``"exact"``, ``"ais"`` or ``"auto"`` (exact when
        at most 2**20 states need enumerating).
    ais_kwargs
        Keyword arguments of :func:`~scqbm.prior.ais_log_partition` for refreshes.
    **vae_kwargs
        Passed to :class:`~scvi.module.VAE`.

    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 32,
        prior: Literal["bm", "rbm"] = "bm",
        n_visible: int | None = None,
        relaxation: Literal["spike_exp", "overlapping_exp"] = "spike_exp",
        beta: float = 10.0,
        sampler: str = "gibbs",
        sampler_kwargs: dict | None = None,
        log_partition: Literal["auto", "exact", "ais"] = "auto",
        ais_kwargs: dict | None = None,
        **vae_kwargs,
    ):
        vae_kwargs.pop("latent_distribution", None)
        super().__init__(
            n_input=n_input, n_latent=n_latent, latent_distribution="normal", **vae_kwargs
        )
        # Swap scVI's Gaussian head for Bernoulli logits, keeping the trunk (and its
        # covariate injection) exactly as SCVI builds it.
        trunk = self.z_encoder.encoder
        self.z_encoder = BernoulliEncoder(trunk, self.n_hidden, n_latent, relaxation, beta)
        self.relaxation = relaxation
        self.beta = beta
        self.prior = BoltzmannPrior(n_latent, structure=prior, n_visible=n_visible)
        self.sampler_name = sampler
        self.sampler = make_sampler(sampler, n_latent, **(sampler_kwargs or {}))
        if log_partition not in ("auto", "exact", "ais"):
            raise ValueError(
                f"`log_partition` must be 'auto', 'exact' or 'ais', got {log_partition!r}."
            )
        if log_partition == "exact" and not self.prior.can_enumerate():
            raise LatentTooLargeError(
                f"`log_partition='exact'` is not feasible for n_latent={n_latent} with "
                f"prior={prior!r}: use log_partition='auto' or 'ais', prior='rbm' (which "
                "enumerates only its smaller side, up to n_latent=40), or n_latent <= 20."
            )
        self.log_partition_method = log_partition
        self.ais_kwargs = {"n_chains": 256, "n_betas": 500, **(ais_kwargs or {})}
        # Current estimate of log Z (value only; gradients come from negative samples).
        self.register_buffer("log_z", torch.tensor(float("nan")))
        self.register_buffer("log_z_stderr", torch.tensor(float("nan")))

    # ------------------------------------------------------------------ log Z
    @property
    def exact_log_partition(self) -> bool:
        """Whether the value of log Z is computed by enumeration."""
        return self.log_partition_method == "exact" or (
            self.log_partition_method == "auto" and self.prior.can_enumerate()
        )

    @torch.no_grad()
    def estimate_log_partition(self, **ais_kwargs) -> LogPartitionEstimate:
        """A fresh estimate of log Z under the current prior parameters."""
        method = "exact" if self.exact_log_partition else "ais"
        return self.prior.log_partition(method, **{**self.ais_kwargs, **ais_kwargs})

    @torch.no_grad()
    def refresh_log_partition(self, **ais_kwargs) -> LogPartitionEstimate:
        """Recompute log Z and store it in the ``log_z`` / ``log_z_stderr`` buffers (in place)."""
        estimate = self.estimate_log_partition(**ais_kwargs)
        self.log_z.fill_(estimate.value)
        self.log_z_stderr.fill_(estimate.stderr)
        return estimate

    def current_log_z(self) -> torch.Tensor:
        """The stored log Z, computed on first use."""
        if torch.isnan(self.log_z):
            self.refresh_log_partition()
        return self.log_z

    @torch.no_grad()
    def sample_negative_phase(self) -> SampleSet:
        """Persistent-chain samples of the prior for the gradient of log Z."""
        return self.sampler.sample(
            self.prior.h,
            self.prior.coupling_matrix(),
            getattr(self.sampler, "num_chains", 512),
            n_visible=self.prior.n_visible,
        )

    # -------------------------------------------------------- minified data
    @auto_move_data
    def _cached_inference(
        self,
        qzm: torch.Tensor,
        qzv: torch.Tensor,
        observed_lib_size: torch.Tensor,
        n_samples: int = 1,
    ) -> dict:
        """Inference from stored posterior logits (minified data): ``qzm`` holds the logits.

        ``qzv`` is the same array under scvi's second key (a Bernoulli has one parameter).
        """
        qz = make_relaxation(self.relaxation, qzm, self.beta)
        z = qz.sample() if n_samples == 1 else qz.sample((n_samples,))
        library = torch.log(observed_lib_size)
        if n_samples > 1:
            library = library.unsqueeze(0).expand((n_samples, *library.shape))
        return {
            MODULE_KEYS.Z_KEY: z,
            MODULE_KEYS.QZ_KEY: qz,
            MODULE_KEYS.QL_KEY: None,
            MODULE_KEYS.LIBRARY_KEY: library,
        }

    # ------------------------------------------------------------- generative
    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        transform_batch: torch.Tensor | None = None,
    ) -> dict:
        """scVI's generative pass on the relaxed latent ``z``.

        The Gaussian ``pz`` that scVI builds is dropped: the prior is ``self.prior``.
        """
        outputs = super().generative(
            z,
            library,
            batch_index,
            cont_covs=cont_covs,
            cat_covs=cat_covs,
            size_factor=size_factor,
            y=y,
            transform_batch=transform_batch,
        )
        outputs[MODULE_KEYS.PZ_KEY] = None
        return outputs

    # -------------------------------------------------------------------- KL
    def kl_divergence_z(
        self,
        logits: torch.Tensor,
        negative_samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-cell ``KL(q(z|x) || p(z)) = -H(q) + E_q[E(z)] + log Z``.

        With ``negative_samples`` (binary ``(S, n)``, no gradient), the log Z term carries the
        gradient ``-mean_s dE(z_s)/dtheta`` while its value stays the stored estimate.
        """
        W = self.prior.coupling_matrix()
        probs = torch.sigmoid(logits)
        log_z = self.current_log_z()
        if negative_samples is not None:
            surrogate = -self.prior.energy(negative_samples, W).mean()
            log_z = log_z + (surrogate - surrogate.detach())
        return -bernoulli_entropy(logits) + self.prior.expected_energy(probs, W) + log_z

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float | torch.Tensor = 1.0,
        negative_samples: torch.Tensor | None = None,
    ) -> LossOutput:
        """Negative ELBO with the Boltzmann prior (see the class docstring)."""
        from torch.distributions import kl_divergence

        x = tensors[REGISTRY_KEYS.X_KEY]
        qz = inference_outputs[MODULE_KEYS.QZ_KEY]
        reconst_loss = -generative_outputs[MODULE_KEYS.PX_KEY].log_prob(x).sum(-1)
        kl_z = self.kl_divergence_z(qz.logits, negative_samples)
        if not self.use_observed_lib_size:
            kl_l = kl_divergence(
                inference_outputs[MODULE_KEYS.QL_KEY], generative_outputs[MODULE_KEYS.PL_KEY]
            ).sum(dim=1)
        else:
            kl_l = torch.zeros_like(kl_z)
        loss = torch.mean(reconst_loss + kl_weight * kl_z + kl_l)
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst_loss,
            kl_local={MODULE_KEYS.KL_L_KEY: kl_l, MODULE_KEYS.KL_Z_KEY: kl_z},
        )

    # ------------------------------------------------------- marginal likelihood
    @torch.inference_mode()
    @auto_move_data
    def marginal_ll(
        self,
        tensors: dict[str, torch.Tensor],
        n_mc_samples: int,
        return_mean: bool = False,
        n_mc_samples_per_pass: int = 1,
    ):
        """Importance-sampled ``log p(x)`` with proposal ``q(z|x) r(zeta|z)``.

        ``p(x) = sum_z p(z) E_{r(zeta|z)}[p(x|zeta)]``, so with ``z ~ q(z|x)`` and
        ``zeta ~ r(zeta|z)`` the weights ``p(z) p(x|zeta) / q(z|x)`` are unbiased for ``p(x)``;
        ``log p(z) = -E(z) - log Z`` uses the stored estimate of log Z.
        """
        n_mc_samples_per_pass = min(n_mc_samples_per_pass, n_mc_samples)
        n_passes = int(np.ceil(n_mc_samples / n_mc_samples_per_pass))
        x = tensors[REGISTRY_KEYS.X_KEY]
        log_z = self.current_log_z()
        W = self.prior.coupling_matrix()
        batch_index = tensors[REGISTRY_KEYS.BATCH_KEY]
        to_sum = []
        for _ in range(n_passes):
            inference_outputs = self.inference(
                **self._get_inference_input(tensors, full_forward_pass=True),
                n_samples=n_mc_samples_per_pass,
            )
            qz = inference_outputs[MODULE_KEYS.QZ_KEY]
            probs = qz.probs.expand((n_mc_samples_per_pass, *qz.probs.shape))
            z = torch.bernoulli(probs)
            zeta = qz.sample_conditional(z)
            generative_inputs = self._get_generative_input(tensors, inference_outputs)
            generative_inputs[MODULE_KEYS.Z_KEY] = zeta
            px = self.generative(**generative_inputs)[MODULE_KEYS.PX_KEY]
            log_px_z = px.log_prob(x).sum(-1)
            log_pz = -self.prior.energy(z, W) - log_z
            log_qz = torch.distributions.Bernoulli(logits=qz.logits).log_prob(z).sum(-1)
            log_w = log_px_z + log_pz - log_qz
            if not self.use_observed_lib_size:
                library = inference_outputs[MODULE_KEYS.LIBRARY_KEY]
                means, variances = self._compute_local_library_params(batch_index)
                log_w = log_w + Normal(means, variances.sqrt()).log_prob(library).sum(-1)
                log_w = log_w - inference_outputs[MODULE_KEYS.QL_KEY].log_prob(library).sum(-1)
            to_sum.append(log_w)
        to_sum = torch.cat(to_sum, dim=0)
        log_lkl = torch.logsumexp(to_sum, dim=0) - math.log(to_sum.shape[0])
        if return_mean:
            return torch.mean(log_lkl).item()
        return log_lkl.cpu()
