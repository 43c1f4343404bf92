"""QBMVAEModule: scVI's encoder/decoder around a binary latent with a Boltzmann prior."""

from __future__ import annotations

import inspect
import math
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.module import VAE
from scvi.module.base import LossOutput, auto_move_data
from torch.distributions import Normal

from scqbm._compat import MODULE_KEYS, vae_encoder_trunk
from scqbm.nn import BernoulliEncoder, make_relaxation
from scqbm.prior import LOG_Z_TOLERANCE, BoltzmannPrior, LogPartitionEstimate
from scqbm.samplers import DEFAULT_NUM_READS, SampleSet, make_sampler

#: A posterior probability beyond (SATURATION_LEVEL, 1 - SATURATION_LEVEL) counts as saturated.
SATURATION_LEVEL = 0.01


class QBMVAEModule(VAE):
    """Variational autoencoder with binary latents and a Boltzmann-machine prior (QBM-VAE).

    Everything outside the latent is scVI's :class:`~scvi.module.VAE` (library size, batch and
    covariate conditioning of the ``FCLayers`` encoder trunk and of ``DecoderSCVI``,
    likelihoods). The latent differs:

    * ``q(z|x)`` is a factorial Bernoulli with logits from :class:`~scqbm.nn.BernoulliEncoder`;
      the decoder sees a relaxed sample ``zeta`` in [0, 1]^n (``relaxation``, ``beta``).
    * ``p(z) = exp(-E(z)) / Z`` with ``E(z) = -h.z - z'Wz`` (:class:`~scqbm.prior.BoltzmannPrior`,
      which owns log Z and the KL: :meth:`~scqbm.prior.BoltzmannPrior.kl`).
    * ``KL(q||p) = -H(q) + E_q[E(z)] + log Z``; the first two terms are exact for a factorial
      ``q``. The gradient of ``log Z`` is ``-E_p[dE/dtheta]``, estimated from negative-phase
      samples (:meth:`sample_negative_phase`) handed to :meth:`loss` by the training plan;
      the *value* of ``log Z`` in the reported KL is the prior's stored estimate.

    Parameters
    ----------
    n_input, n_batch, n_labels, n_hidden, n_latent, n_layers, dropout_rate, ...
        As in :class:`~scvi.module.VAE` (``n_latent`` is the number of binary units).
    prior
        ``"rbm"`` (bipartite), ``"bm"`` (fully connected) or ``"factorial"`` (fields only, no
        couplings: the ablation; exact log Z and no negative phase).
    n_visible
        First-side size of the RBM prior (default ``n_latent // 2``).
    relaxation
        ``"spike_exp"`` (Rolfe 2016) or ``"overlapping_exp"`` (DVAE++).
    beta
        Sharpness of the relaxation.
    sampler, sampler_kwargs
        Negative-phase backend by name (see :func:`scqbm.samplers.available_samplers`).
    num_negative_samples
        Negative samples per training step when the sampler leaves the number to the caller
        (its ``properties["num_reads"]`` is ``None``; default
        :data:`~scqbm.samplers.DEFAULT_NUM_READS`). A sampler that declares its number (the
        chain samplers' ``num_chains``) must not be contradicted.
    log_partition
        How the value of log Z is estimated: ``"exact"``, ``"ais"`` or ``"auto"`` (exact when
        at most 2**20 states need enumerating).
    ais_kwargs
        AIS settings of the prior's refreshes (see :class:`~scqbm.prior.BoltzmannPrior`).
    log_z_tolerance
        Drift tolerance (nats) of the stored log Z (see
        :meth:`~scqbm.prior.BoltzmannPrior.log_z_drift`).
    **vae_kwargs
        Passed to :class:`~scvi.module.VAE`.

    """

    def __init__(
        self,
        n_input: int,
        n_latent: int = 32,
        prior: Literal["bm", "rbm", "factorial"] = "rbm",
        n_visible: int | None = None,
        relaxation: Literal["spike_exp", "overlapping_exp"] = "spike_exp",
        beta: float = 3.0,
        sampler: str = "gibbs",
        sampler_kwargs: dict | None = None,
        num_negative_samples: int | None = None,
        log_partition: Literal["auto", "exact", "ais"] = "auto",
        ais_kwargs: dict | None = None,
        log_z_tolerance: float = LOG_Z_TOLERANCE,
        **vae_kwargs,
    ):
        vae_kwargs.pop("latent_distribution", None)
        super().__init__(
            n_input=n_input, n_latent=n_latent, latent_distribution="normal", **vae_kwargs
        )
        # Swap scVI's Gaussian head for Bernoulli logits, keeping the trunk (and its
        # covariate injection) exactly as SCVI builds it.
        trunk = vae_encoder_trunk(self)
        self.z_encoder = BernoulliEncoder(trunk, self.n_hidden, n_latent, relaxation, beta)
        self.relaxation = relaxation
        self.beta = beta
        self.prior = BoltzmannPrior(
            n_latent,
            structure=prior,
            n_visible=n_visible,
            log_partition=log_partition,
            ais_kwargs=ais_kwargs,
            log_z_tolerance=log_z_tolerance,
        )
        self.sampler_name = sampler
        self.sampler = make_sampler(sampler, n_latent, **(sampler_kwargs or {}))
        self.num_negative_samples = self._resolve_num_reads(num_negative_samples)
        # Fraction of saturated posterior probabilities on the last training batch (a 0-d
        # tensor on the module's device; None before the first training step).
        self.last_saturation: torch.Tensor | None = None

    def _resolve_num_reads(self, requested: int | None) -> int:
        declared = self.sampler.properties["num_reads"]
        if requested is not None:
            if isinstance(requested, bool) or int(requested) != requested or requested < 1:
                raise ValueError(
                    f"`num_negative_samples` must be a positive integer, got {requested!r}."
                )
            if declared is not None and int(requested) != declared:
                raise ValueError(
                    f"`num_negative_samples={requested}` contradicts sampler "
                    f"{self.sampler_name!r}, "
                    f"which is built for {declared} reads per step: set it in `sampler_kwargs` "
                    "(e.g. num_chains) instead."
                )
            return int(requested)
        return DEFAULT_NUM_READS if declared is None else int(declared)

    # ------------------------------------------------------------------ log Z
    @property
    def exact_log_partition(self) -> bool:
        """Whether the value of log Z is computed exactly (see the prior)."""
        return self.prior.exact

    def refresh_log_partition(self, final: bool = False, **ais_kwargs) -> LogPartitionEstimate:
        """Re-estimate and store log Z (see :meth:`~scqbm.prior.BoltzmannPrior.refresh`)."""
        return self.prior.refresh(final=final, **ais_kwargs)

    @torch.no_grad()
    def sample_negative_phase(self) -> SampleSet | None:
        """Negative-phase samples of the prior for the gradient of log Z.

        ``num_negative_samples`` reads (the sampler's declared number); ``None`` for a prior
        that needs none (``"factorial"``: exact gradient in closed form).
        """
        if not self.prior.needs_negative_phase:
            return None
        # The prior builds a valid problem by construction (symmetric, zero diagonal,
        # bipartite for an RBM): no per-step validation with its device-to-host reads.
        return self.sampler.sample(
            self.prior.h,
            self.prior.coupling_matrix(),
            self.num_negative_samples,
            n_visible=self.prior.n_visible,
            check=False,
        )

    @torch.no_grad()
    def sample_prior(self, n_samples: int, burn_in: int = 1_000, seed: int | None = None):
        """Binary prior samples from fresh chains (training chains untouched)."""
        return self.prior.sample(n_samples, burn_in=burn_in, seed=seed)

    @torch.no_grad()
    def generate_from_prior(
        self,
        n_cells: int,
        batch_index: torch.Tensor,
        log_library: torch.Tensor,
        burn_in: int = 1_000,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.distributions.Distribution]:
        """``z ~ p(z)``, ``zeta ~ r(zeta | z)``, then the decoder's distribution of counts.

        Returns ``(z, prior energies of z, px)``; ``batch_index`` and ``log_library`` have
        shape ``(n_cells, 1)``.
        """
        z = self.sample_prior(n_cells, burn_in=burn_in, seed=seed).to(self.device)
        relaxation = make_relaxation(
            self.relaxation, torch.zeros(1, device=self.device), self.beta
        )
        zeta = relaxation.sample_conditional(z)
        px = self.generative(
            z=zeta,
            library=log_library.to(device=self.device, dtype=zeta.dtype),
            batch_index=batch_index.to(self.device),
            y=torch.zeros_like(batch_index, device=self.device),
        )[MODULE_KEYS.PX_KEY]
        return z, self.prior.energy(z), px

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before the prior owned log Z kept it on the module.
        for key in ("log_z", "log_z_stderr"):
            if prefix + key in state_dict and prefix + "prior." + key not in state_dict:
                state_dict[prefix + "prior." + key] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """Per-cell ``KL(q(z|x) || p(z))`` (see :meth:`~scqbm.prior.BoltzmannPrior.kl`)."""
        return self.prior.kl(logits, negative_samples)

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
        if self.training:  # a training step: watch for a saturated latent
            with torch.no_grad():
                probs = qz.probs
                level = SATURATION_LEVEL
                saturated = ((probs < level) | (probs > 1.0 - level)).float().mean()
            self.last_saturation = saturated
        if not self.use_observed_lib_size:
            kl_l = kl_divergence(
                inference_outputs[MODULE_KEYS.QL_KEY], generative_outputs[MODULE_KEYS.PL_KEY]
            ).sum(dim=1)
        else:
            kl_l = torch.zeros_like(kl_z)
        loss = torch.mean(reconst_loss + kl_weight * kl_z + kl_l)
        # As scVI's loss: the latent, batches and labels for scvi's autotune metrics.
        extra_metrics = {}
        if self.extra_payload_autotune:
            extra_metrics = {
                MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
                "batch": tensors[REGISTRY_KEYS.BATCH_KEY],
                "labels": tensors[REGISTRY_KEYS.LABELS_KEY],
            }
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst_loss,
            kl_local={MODULE_KEYS.KL_L_KEY: kl_l, MODULE_KEYS.KL_Z_KEY: kl_z},
            extra_metrics=extra_metrics,
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
        log_z = self.prior.current_log_z()
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


def _signature_with_vae_arguments(cls) -> inspect.Signature:
    """``cls.__init__``'s signature with VAE's keyword arguments spelled out.

    scvi-tools rebuilds a module from the saved init arguments that its class signature names
    (``load`` of a model trained from a data module, on scvi-tools 1.4); behind
    ``**vae_kwargs`` it would see neither ``n_batch`` nor ``n_hidden``. The VAE arguments are
    read from the installed :class:`~scvi.module.VAE`, so they follow its release.
    """
    own = inspect.signature(cls.__init__).parameters
    params = [p for name, p in own.items() if name != "self" and p.kind is not p.VAR_KEYWORD]
    params = [params[0], *(p.replace(kind=p.KEYWORD_ONLY) for p in params[1:])]
    params += [
        p.replace(kind=p.KEYWORD_ONLY)
        for name, p in inspect.signature(VAE.__init__).parameters.items()
        if name not in own and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty
    ]
    return inspect.Signature([*params, own["vae_kwargs"]])


QBMVAEModule.__signature__ = _signature_with_vae_arguments(QBMVAEModule)
