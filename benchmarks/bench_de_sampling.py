"""Why QBMVAE's DE after short trainings finds few genes: posterior sharpness and latent noise.

Trains scVI and QBMVAE (defaults except ``max_epochs``; batch size 128, as the suite's
``matched`` regime) on the suite's Kang subset (``load_dataset("kang", max_cells=...)``) and
runs the suite's DE task (scvi-tools' 1-vs-all DE, ``mode="change"``, scored on the canonical
markers; :func:`scqbm.benchmark.model_de_metrics`) on each. For QBMVAE it first prints how
sharp the posteriors are (mean ``|q - 1/2|`` and the share of probabilities within
[0.25, 0.75]), then repeats the DE with the latent that normalised expression decodes
replaced, one source of noise at a time:

* ``posterior``: what QBMVAE does, ``zeta ~ q(zeta | x)`` (binary ``z ~ q(z|x)``, then the
  relaxation's ``zeta ~ r(zeta | z)``);
* ``binary``: ``z ~ q(z|x)``, then ``zeta = E[zeta | z]`` (no relaxation noise);
* ``mean``: ``zeta = E_q[zeta]`` (no posterior noise at all; DE then only sees the spread
  between cells).

The two replacements are diagnostics, not options of the model: they tell how much of the
gap in FDR genes to scVI is sampling noise of the latent and how much is what the decoder has
learned (the marker ranks by ``lfc_mean`` do not depend on the noise much).

``--variants`` adds QBMVAE settings to the comparison (DE of the posterior only), each a JSON
object of model arguments, with ``plan_kwargs`` going to ``train`` and ``logit_head_scale``
(a diagnostic, not a model option) multiplying the encoder's logit layer by a constant while
dividing its initial weights by it: the same initial logits, an Adam step that moves them that
many times faster, everything else unchanged.

Usage::

    python benchmarks/bench_de_sampling.py | tee benchmarks/results/de_sampling.log
    python benchmarks/bench_de_sampling.py --max-epochs 20 --seeds 0
    python benchmarks/bench_de_sampling.py --seeds 0 --variants \
        '{"plan_kwargs": {"lr": 0.003, "lr_prior": 0.001}}' '{"beta": 5}' \
        '{"logit_head_scale": 10}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import numpy as np

KEYS = (
    "n_fdr_total",
    "median_rank_lfc",
    "median_rank_bf",
    "n_types_top20_lfc",
    "n_types_top20_bf",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--max-cells", type=int, default=4_000)
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        type=json.loads,
        help="QBMVAE settings to add, each a JSON object (see the module docstring)",
    )
    return p.parse_args()


@contextlib.contextmanager
def decoded_latent(model, variant: str):
    """Replace the relaxed samples the encoder hands out (``variant``, see the docstring)."""
    import torch

    if variant == "posterior":
        yield
        return
    encoder = model.module.z_encoder
    forward = encoder.forward

    def replaced(*args, **kwargs):
        qz, _ = forward(*args, **kwargs)
        one = qz.conditional_icdf  # E[zeta | z] for z in {0, 1}, from the relaxation itself

        def rsample(sample_shape=()):
            shape = (*sample_shape, *qz.logits.shape)
            if variant == "mean":
                return qz.mean.expand(shape)
            z = torch.bernoulli(qz.probs.expand(shape))
            means = conditional_means(one, qz.logits)
            return torch.where(z > 0, means[1], means[0])

        qz.rsample = rsample
        return qz, rsample()

    encoder.forward = replaced
    try:
        yield
    finally:
        del encoder.forward  # the class's method again


def conditional_means(conditional_icdf, like, n: int = 4_097):
    """``E[zeta | z=0]`` and ``E[zeta | z=1]`` by the midpoint rule on the inverse CDF."""
    import torch

    rho = (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n
    return tuple(float(conditional_icdf(torch.full_like(rho, z), rho).mean()) for z in (0, 1))


def scale_logit_head(model, scale: float) -> None:
    """Make the encoder's logit layer learn ``scale`` times faster (same initial logits)."""
    import torch

    linear = model.module.z_encoder.logit_encoder
    with torch.no_grad():
        linear.weight /= scale
        linear.bias /= scale

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, h):
            return scale * self.linear(h)

    model.module.z_encoder.logit_encoder = Scaled()


def sharpness(model) -> dict[str, float]:
    probs = model.get_latent_representation(representation="probabilities")
    distance = np.abs(probs - 0.5)
    return {
        "mean_abs_q_minus_half": float(distance.mean()),
        "share_in_0.25_0.75": float((distance <= 0.25).mean()),
    }


def main() -> None:
    args = parse_args()
    import scvi
    import torch

    import scqbm
    from scqbm.benchmark import load_dataset, model_de_metrics
    from scqbm.benchmark._methods import _model_adata

    torch.set_num_threads(args.threads)
    data = load_dataset("kang", max_cells=args.max_cells, seed=0)
    print(
        f"Kang subset {data.adata.n_obs:,} cells x {data.adata.n_vars:,} genes; "
        f"{args.max_epochs} epochs, batch size 128; python {platform.python_version()}, "
        f"scvi-tools {scvi.__version__}, torch {torch.__version__}, scqbm {scqbm.__version__}"
    )
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = [("scvi", scvi.model.SCVI, {}), ("qbmvae", scqbm.QBMVAE, {})]
        runs += [(f"qbmvae {json.dumps(v)}", scqbm.QBMVAE, v) for v in args.variants]
        for name, cls, setting in runs:
            setting = dict(setting)
            plan_kwargs = setting.pop("plan_kwargs", None)
            head_scale = setting.pop("logit_head_scale", None)
            scvi.settings.seed = seed
            adata = _model_adata(data.adata)
            cls.setup_anndata(adata, batch_key=data.batch_key)
            model = cls(adata, **setting)
            if head_scale:
                scale_logit_head(model, float(head_scale))
            start = time.perf_counter()
            model.train(
                max_epochs=args.max_epochs,
                batch_size=128,
                enable_progress_bar=False,
                plan_kwargs=plan_kwargs,
            )
            seconds = time.perf_counter() - start
            extra = sharpness(model) if name != "scvi" else {}
            variants = ("posterior", "binary", "mean") if name == "qbmvae" else ("posterior",)
            for variant in variants:
                with decoded_latent(model, variant):
                    metrics = model_de_metrics(model, data, seed=seed)
                rows.append({"seed": seed, "model": name, "decoded": variant, **extra, **metrics})
                print(
                    f"seed {seed} {name} decoded={variant:9s} train {seconds:5.1f} s  "
                    + "  ".join(f"{k} {metrics[k]:g}" for k in KEYS)
                    + "".join(f"  {k} {v:.3f}" for k, v in extra.items())
                )
    print("\nFDR genes against scVI's (same seed):")
    for row in rows:
        if row["model"] != "scvi":
            ref = next(r for r in rows if r["model"] == "scvi" and r["seed"] == row["seed"])
            ratio = row["n_fdr_total"] / max(ref["n_fdr_total"], 1.0)
            print(
                f"seed {row['seed']} {row['model']} decoded={row['decoded']:9s} "
                f"{row['n_fdr_total']:6.0f} vs "
                f"{ref['n_fdr_total']:6.0f}  ratio {ratio:.2f}  "
                f"types with a marker in the top 20 (lfc/BF): {row['n_types_top20_lfc']:.0f}/"
                f"{row['n_types_top20_bf']:.0f} vs {ref['n_types_top20_lfc']:.0f}/"
                f"{ref['n_types_top20_bf']:.0f}"
            )


if __name__ == "__main__":
    main()
