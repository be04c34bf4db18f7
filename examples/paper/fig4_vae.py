"""Fig 4 of Kingma & Ba (2015): bias correction, on a variational autoencoder of MNIST.

Adam with and without its bias-correction terms over β1 ∈ {0, 0.9}, β2 ∈ {0.99, 0.999,
0.9999} and a sweep of log10(α) over [-5, -1]; the loss (negative evidence lower bound
per image, on the training set) after a short and a longer training budget. The paper:
without bias correction, β2 close to 1 makes training unstable, most at large step sizes
and early on. torch.optim has no Adam without bias correction, so ``--impl torch`` draws
the corrected curves only.

    python examples/paper/fig4_vae.py --preset quick [--impl torch] [--out DIR | --regenerate-docs]
"""
from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
import adampaper
import matplotlib.pyplot as plt  # noqa: E402  (after adampaper: it says what is missing)
from adampaper import DEVICE, data, optimizers, presets, report
from adampaper.flat import Flat
from adampaper.training import Trainer, evaluate
from torch import nn

FIGURE = "fig4_vae"


class VAE(nn.Module):
    """Kingma & Welling's MNIST autoencoder: one softplus hidden layer in the encoder and
    in the decoder, a spherical Gaussian latent, Bernoulli pixels. Calling it on images
    returns their mean negative evidence lower bound (nats per image)."""

    def __init__(self, hidden: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, hidden), nn.Softplus(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Softplus(), nn.Linear(hidden, 784))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(1)
        kl = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(1)
        return (reconstruction + kl).mean()


def negative_elbo(model, x, _labels):
    return model(x)


def sweep(s, impl: str, train: data.Dataset) -> tuple[list[dict], list[str]]:
    """One record per (bias correction, β1, β2, α): the loss after each budget (None once
    training diverged), and notes on the settings the implementation cannot run."""
    records, notes = [], []
    for correct, beta1, beta2, log_lr in itertools.product((True, False), s.beta1, s.beta2, s.log10_lr):
        torch.manual_seed(s.seed)
        model = Flat(VAE(s.hidden, s.latent).to(DEVICE))
        try:
            opt = optimizers.build("adam", [model.param], 10.0 ** log_lr, impl, betas=(beta1, beta2),
                                   bias_correction=correct)
        except optimizers.Unavailable as e:
            if str(e) not in notes:
                notes.append(str(e))
            continue
        initial = evaluate(model, negative_elbo, train)
        trainer = Trainer(model, negative_elbo, train, opt, seed=s.seed)
        loss, done = {}, 0
        for budget in s.budgets:
            trainer.run(budget - done)
            done = budget
            loss[str(budget)] = math.nan if trainer.diverged else evaluate(model, negative_elbo, train)
        records.append({"bias_correction": correct, "beta1": beta1, "beta2": beta2, "log10_lr": log_lr,
                        "initial_loss": initial, "loss_after_epochs": loss, "seconds": round(trainer.seconds, 2)})
        print(f"fig 4  correction={correct!s:5} β1={beta1:<4} β2={beta2:<6} log10(α)={log_lr:<5}",
              " ".join(f"{b} ep: {v:9.2f}" for b, v in loss.items()), flush=True)
    return records, notes


def plot(records: list[dict], s, train: data.Dataset, path, preset: str, impl: str, notes: list[str]) -> None:
    """The paper's layout: a row per β1, a panel per (budget, β2), loss against log10(α);
    red with bias correction, green without; a diverged run is an x at the panel's top."""
    finite = [v for r in records for v in r["loss_after_epochs"].values() if math.isfinite(v)]
    top = min(max(finite), 10 * min(finite))
    fig, axes = plt.subplots(len(s.beta1), len(s.budgets) * len(s.beta2), figsize=(17, 3 + 2.2 * len(s.beta1)),
                             sharey=True, squeeze=False)
    for row, beta1 in enumerate(s.beta1):
        for col, (budget, beta2) in enumerate(itertools.product(s.budgets, s.beta2)):
            ax = axes[row, col]
            for correct, color in ((True, "tab:red"), (False, "tab:green")):
                pts = [(r["log10_lr"], r["loss_after_epochs"][str(budget)]) for r in records
                       if r["bias_correction"] == correct and r["beta1"] == beta1 and r["beta2"] == beta2]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                y = [min(v, top) if math.isfinite(v) else math.nan for _, v in pts]
                ax.plot(x, y, "o-", color=color, markersize=3.5,
                        label="bias correction" if correct else "no bias correction")
                bad = [p[0] for p in pts if not math.isfinite(p[1]) or p[1] > top]
                ax.plot(bad, [top] * len(bad), "x", color=color, markersize=8, markeredgewidth=2)
            report.log_scale(ax)
            ax.set_title(f"{budget} epoch{'s' if budget > 1 else ''}, β1={beta1}, β2={beta2}", fontsize=9)
            ax.set_xlabel("log10(α)")
            ax.grid(alpha=0.3, which="both")
        axes[row, 0].set_ylabel("loss (−ELBO, nats/image)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"VAE 784-{s.hidden}-{s.latent} on {len(train)} MNIST digits: Adam with and without bias correction"
                 + ("" if not notes else f" ({'; '.join(notes)})"), fontsize=10)
    report.save_figure(fig, path, preset, impl)


def main(argv: list[str] | None = None) -> dict:
    args = presets.parse_args("fig4", __doc__, argv)
    s = args.settings
    start = time.perf_counter()
    train, test = (d.to(DEVICE) for d in data.mnist())
    train = train.head(s.n_train)
    records, notes = sweep(s, args.impl, train)
    name = report.stem(FIGURE, args.preset, args.impl) + args.suffix
    plot(records, s, train, args.out / f"{name}.png", args.preset, args.impl, notes)
    results = {
        "figure": "Fig 4: bias correction (VAE)", "preset": args.preset, "impl": args.impl, **report.environment(),
        "settings": vars(s), "seconds": round(time.perf_counter() - start, 1), "notes": notes,
        "data": data.describe("mnist", train, test), "runs": records,
    }
    report.save_json(args.out / f"{name}.json", results)
    return results


if __name__ == "__main__":
    adampaper.run_script(main, "mnist")
