"""Scaling laws: how the final loss falls with model size N and training tokens D, and how to split compute.

The Chinchilla paper (Hoffmann et al., 2022) models the loss a run reaches as

    L(N, D) = E + A / N^alpha + B / D^beta

E is the loss no model reaches (the entropy of the text itself), A / N^alpha what a model of
N parameters cannot represent however long it trains, and B / D^beta what D tokens of
training have not yet taught it. Five numbers, fitted to the (N, D, L) of several runs,
then answer the practical question: for a compute budget, how big a model, trained on how
many tokens?

The fit follows the paper's third approach. The prediction is written in log space,
log L = logsumexp(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e),
so that it stays positive, and the Huber loss (delta 1e-3) of log L_predicted - log L_observed
is minimised: every run counts by its relative error, and a run that is off (a spike, a bad
seed) pulls on the fit linearly instead of quadratically. The surface is not convex, so the
objective is first evaluated on a grid of starting points and L-BFGS runs from the best few.

Training costs about C = 6 N D FLOPs (2 per parameter per token forward, 4 backward).
Minimising L(N, D) subject to 6 N D = C gives

    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),  D_opt(C) = (C / 6) / N_opt(C),
    G = (alpha A / (beta B))^(1 / (alpha + beta)),

and D_opt / N_opt, the tokens per parameter (about 20 in the paper), changes with C unless
alpha = beta.

Five numbers need at least five runs, with at least three values of N and three of D: with
one D for every run, B / D^beta is the same constant everywhere and cannot be told apart from
E, and with two, one difference is left for the two unknowns B and beta.
Then the fit falls back to L(N) = E' + A / N^alpha, with E' = E + B / D^beta at that D, which
still says how the loss falls with size at this data budget but not how to split compute.
(When only D varies, the fallback is L(D) the same way.)

N is the total parameter count by default, as in Chinchilla; Kaplan et al. (2020) counted
non-embedding parameters instead, and at small sizes the choice changes the exponents
(`scaling_points(..., non_embedding=True)` gives theirs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from binarylm.errors import BinaryLMError
from binarylm.eval.report import (
    Curve,
    Panel,
    draw_png,
    fmt_number,
    fmt_si,
    load_run,
    markdown_table,
    write_markdown_and_html,
)

HUBER_DELTA = 1e-3  # as in the Chinchilla paper
STARTS = 8  # L-BFGS runs from this many of the best grid points
RESTARTS = 4  # at most this many L-BFGS calls per start, while they still improve
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)  # log E
GRID_LOG_COEF = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)  # log A, log B
GRID_EXPONENT = (0.0, 0.5, 1.0, 1.5, 2.0)  # alpha, beta
DEFAULT_BUDGETS = (1e15, 1e17, 1e19, 1e21)  # FLOPs


@dataclass(frozen=True)
class Point:
    """One run: N parameters trained on D tokens reached validation loss L (nats per token)."""

    name: str
    params: float  # N
    tokens: float  # D
    loss: float  # L


@dataclass
class ScalingFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; in a fallback fit the term that could not be fitted is None."""

    E: float
    A: float | None
    alpha: float | None
    B: float | None
    beta: float | None
    form: str  # "L(N, D)", or the fallback "L(N)" / "L(D)"
    note: str  # why the fit fell back ("" when it did not)
    points: list[Point]
    objective: float  # the Huber loss at the optimum

    @property
    def complete(self) -> bool:
        return self.form == "L(N, D)"

    def predict(self, params: float, tokens: float) -> float:
        """The fitted loss; a fallback fit ignores the variable it could not fit (its term is inside E)."""
        loss = self.E
        if self.A is not None:
            loss += self.A / params ** self.alpha
        if self.B is not None:
            loss += self.B / tokens ** self.beta
        return loss


# ------------------------------------------------------------------ reading runs


def scaling_points(run_dirs: Sequence[str | Path], non_embedding: bool = False) -> list[Point]:
    """(N, D, L) of each run: N from its config (the model built on the meta device), D = tokens seen
    and L = the last validation loss, from metrics.jsonl (else the checkpoint's metrics.json)."""
    points = []
    for path in run_dirs:
        run = load_run(path)
        loss = run.last("val", "loss") or run.final.get("val_loss")
        missing = [what for what, value in (("a checkpoint's config.json", run.size),
                                            ("tokens seen", run.tokens_seen), ("a validation loss", loss))
                   if not value]
        if missing:
            raise BinaryLMError(f"{run.path} lacks {', '.join(missing)}; the scaling fit needs pretraining runs "
                                "that have validated at least once")
        params = run.size.non_embedding if non_embedding else run.size.params
        points.append(Point(str(run.path), float(params), float(run.tokens_seen), float(loss)))
    return points


# ------------------------------------------------------------------ fitting


def fit_scaling_law(points: Sequence[Point], delta: float = HUBER_DELTA) -> ScalingFit:
    """Fit L(N, D) when the points identify all five numbers, else the one-variable fallback (see `note`).

    Each term needs three different values of its variable: E soaks up any constant, so two
    values of D leave one difference for the two unknowns B and beta.
    """
    points = list(points)
    if any(p.params <= 0 or p.tokens <= 0 or p.loss <= 0 for p in points):
        raise BinaryLMError("every scaling point needs positive parameters, tokens and loss")
    sizes, budgets = len({p.params for p in points}), len({p.tokens for p in points})
    if len(points) >= 5 and sizes >= 3 and budgets >= 3:
        e, a, alpha, b, beta, objective = _fit(points, ("params", "tokens"), delta)
        fit = ScalingFit(math.exp(e), math.exp(a), alpha, math.exp(b), beta, "L(N, D)", "", points, objective)
        return _with_exponent_warning(fit)
    if sizes >= 3 or budgets >= 3:
        return _with_exponent_warning(_fallback(points, along="params" if sizes >= 3 else "tokens", delta=delta))
    raise BinaryLMError(f"{len(points)} runs with {sizes} model sizes and {budgets} token counts cannot be fitted; "
                        "L(N) needs at least 3 model sizes (L(N, D): at least 5 runs, 3 sizes and 3 token counts)")


def _with_exponent_warning(fit: ScalingFit) -> ScalingFit:
    """The fit, its note saying so when an exponent came out negative: loss that rises with size or data is no
    scaling law, usually a sign of runs too noisy or too short to compare."""
    negative = [name for name in ("alpha", "beta") if getattr(fit, name) is not None and getattr(fit, name) <= 0]
    if not negative:
        return fit
    warning = (f"{' and '.join(negative)} came out at or below zero: in these runs loss does not fall as the model "
               "or the data grows, so this fit is no scaling law; check that the runs are comparable and trained "
               "long enough.")
    return dataclasses.replace(fit, note=f"{fit.note} {warning}".strip())


def _fallback(points: list[Point], along: str, delta: float) -> ScalingFit:
    """L(N) = E' + A / N^alpha (or the same in D) when the full form cannot be identified."""
    symbol, other = ("N", "D") if along == "params" else ("D", "N")
    held = sorted({getattr(p, "tokens" if along == "params" else "params") for p in points})
    reasons = [f"only {len(points)} runs (five numbers need at least 5)"] if len(points) < 5 else []
    if len(held) < 3:
        reasons.append(f"every run has the same {other} = {held[0]:.3g}" if len(held) == 1
                       else f"only {len(held)} different values of {other} (its term needs 3)")
    why = "; ".join(reasons)
    varying = f", although {other} ranges over {held[0]:.3g} .. {held[-1]:.3g}" if len(held) > 1 else ""
    term = "A / N^alpha" if symbol == "N" else "B / D^beta"
    note = (f"The runs cannot identify all five numbers of L(N, D): {why}. Fitted L({symbol}) = E + {term} "
            f"instead, with {other} held fixed{varying}; E then includes the {other} term, and no compute-optimal "
            "split follows.")
    e, coef, exponent, objective = _fit(points, (along,), delta)
    if along == "params":
        return ScalingFit(math.exp(e), math.exp(coef), exponent, None, None, "L(N)", note, points, objective)
    return ScalingFit(math.exp(e), None, None, math.exp(coef), exponent, "L(D)", note, points, objective)


def _fit(points: list[Point], variables: tuple[str, ...], delta: float) -> tuple[float, ...]:
    """(e, a1, exponent1, [a2, exponent2], objective): grid search, then L-BFGS from the best starts."""
    log_xs = [torch.tensor([math.log(getattr(p, v)) for p in points], dtype=torch.float64) for v in variables]
    log_loss = torch.tensor([math.log(p.loss) for p in points], dtype=torch.float64)
    grid = _start_grid(len(variables))  # (G, 1 + 2 * len(variables))
    with torch.no_grad():
        scores = _objective(grid, log_xs, log_loss, delta)  # (G,)
    starts = grid[scores.argsort()[:STARTS]]
    best = min((_lbfgs(start, log_xs, log_loss, delta) for start in starts), key=lambda found: found[1])
    return (*best[0].tolist(), best[1])


def _start_grid(n_terms: int) -> torch.Tensor:
    """Every combination of the grid values: rows (e, a_1, exponent_1, ..., a_n, exponent_n)."""
    term = list(itertools.product(GRID_LOG_COEF, GRID_EXPONENT))
    rows = [(e, *itertools.chain.from_iterable(terms))
            for e in GRID_E for terms in itertools.product(term, repeat=n_terms)]
    return torch.tensor(rows, dtype=torch.float64)


def _predicted_log_loss(theta: torch.Tensor, log_xs: list[torch.Tensor]) -> torch.Tensor:
    """log(E + sum_i A_i / x_i^exponent_i) for each row of theta = (e, a_1, exponent_1, ...): (G, n)."""
    e = theta[:, :1].expand(-1, len(log_xs[0]))  # (G, n)
    terms = [theta[:, 1 + 2 * i, None] - theta[:, 2 + 2 * i, None] * log_x for i, log_x in enumerate(log_xs)]
    return torch.logsumexp(torch.stack([e, *terms]), dim=0)  # (G, n)


def _objective(theta: torch.Tensor, log_xs: list[torch.Tensor], log_loss: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Summed Huber loss of the log-space residuals, one value per row of theta: (G,)."""
    residual = _predicted_log_loss(theta, log_xs) - log_loss  # (G, n)
    return F.huber_loss(residual, torch.zeros_like(residual), reduction="none", delta=delta).sum(dim=1)


def _lbfgs(start: torch.Tensor, log_xs: list[torch.Tensor], log_loss: torch.Tensor,
           delta: float) -> tuple[torch.Tensor, float]:
    """Minimise the objective from one start; (parameters, objective)."""
    theta = start.clone().unsqueeze(0).requires_grad_(True)  # (1, P)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = _objective(theta, log_xs, log_loss, delta).sum() / delta  # / delta: gradients of order 1
        value.backward()
        return value

    previous = math.inf
    for _ in range(RESTARTS):  # L-BFGS can stop on a flat stretch of the Huber loss; a fresh history moves on
        value = optimizer.step(closure).item()
        optimizer.state.clear()
        if not previous - value > 1e-9 * abs(previous):
            break
        previous = value
    with torch.no_grad():
        value = _objective(theta, log_xs, log_loss, delta).item()
    if not math.isfinite(value):
        return theta.detach()[0], math.inf
    return theta.detach()[0], value


# ------------------------------------------------------------------ using the fit


def compute_optimal(fit: ScalingFit, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) that minimise the fitted L(N, D) for a training budget of `flops` = 6 N D."""
    if not fit.complete:
        raise BinaryLMError(f"a compute-optimal split needs the full L(N, D) fit; this one is {fit.form} "
                            "(train runs of several sizes on several token counts)")
    if fit.alpha <= 0 or fit.beta <= 0:
        raise BinaryLMError(f"a compute-optimal split needs positive exponents; this fit has alpha={fit.alpha:.3g}, "
                            f"beta={fit.beta:.3g} ({fit.note})")
    exponent_sum = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / exponent_sum)
    params = g * (flops / 6) ** (fit.beta / exponent_sum)
    return params, flops / 6 / params


def scaling_report(run_dirs: Sequence[str | Path], out_dir: str | Path,
                   budgets: Sequence[float] = DEFAULT_BUDGETS) -> str:
    """Fit the runs, write out_dir/scaling.md (+ .html and scaling.png) and return the markdown."""
    out_dir = Path(out_dir)
    fit = fit_scaling_law(scaling_points(run_dirs))
    has_plot = draw_png(out_dir / "scaling.png", [_panel(fit, "params"), _panel(fit, "tokens")])
    lines = ["# Scaling law", "", f"Fitted {fit.form} to {len(fit.points)} runs by minimising the Huber loss "
             f"(delta {HUBER_DELTA:g}) of log-space residuals, L-BFGS from the best of a grid of starts.", ""]
    if fit.note:
        lines += [f"**Fallback:** {fit.note}", ""]
    lines += ["## Runs", "", *_points_table(fit), "", "## Fitted parameters", "", *_parameter_table(fit), ""]
    lines += ["## Compute-optimal allocation", "", *_optimal_table(fit, budgets), *_extrapolation(fit, budgets), ""]
    if has_plot:
        lines += ["## Loss against parameters and tokens", "", "![scaling](scaling.png)", ""]
    text = "\n".join(lines)
    write_markdown_and_html(text, out_dir / "scaling.md", "Scaling law")
    return text


EXTRAPOLATION = 100  # budgets more than this many times the largest run's compute are flagged


def _extrapolation(fit: ScalingFit, budgets: Sequence[float]) -> list[str]:
    """A warning line for the budgets far beyond the compute of the runs the law was fitted to."""
    largest = max(6 * point.params * point.tokens for point in fit.points)
    beyond = [budget for budget in budgets if budget > EXTRAPOLATION * largest]
    if not fit.complete or not beyond:
        return []
    return ["", f"**Extrapolation:** the largest run used {largest:.3g} FLOPs; the budgets "
            f"{', '.join(f'{budget:.0e}' for budget in beyond)} are more than {EXTRAPOLATION}x beyond it, where a "
            "law fitted to small runs is a guess, not a measurement."]


def _points_table(fit: ScalingFit) -> list[str]:
    rows = []
    for p in fit.points:
        predicted = fit.predict(p.params, p.tokens)
        rows.append([f"`{p.name}`", fmt_si(p.params), fmt_si(p.tokens), fmt_number(p.loss),
                     fmt_number(predicted), f"{predicted / p.loss - 1:+.2%}"])
    return markdown_table(["run", "parameters N", "tokens D", "validation loss L", "fitted L", "error"], rows)


def _parameter_table(fit: ScalingFit) -> list[str]:
    irreducible = "the loss no model reaches" + ("" if fit.complete else ", plus the term that was held fixed")
    meanings = [("E", fit.E, irreducible),
                ("A", fit.A, "scale of the model-size term A / N^alpha"),
                ("alpha", fit.alpha, "how fast loss falls with parameters"),
                ("B", fit.B, "scale of the data term B / D^beta"),
                ("beta", fit.beta, "how fast loss falls with tokens")]
    rows = [[name, f"{value:.4g}", meaning] for name, value, meaning in meanings if value is not None]
    return markdown_table(["parameter", "value", "meaning"], rows)


def _optimal_table(fit: ScalingFit, budgets: Sequence[float]) -> list[str]:
    if not fit.complete:
        return ["Not available from the fallback fit: it needs at least 5 runs with 3 model sizes and 3 token counts."]
    rows = []
    for flops in budgets:
        params, tokens = compute_optimal(fit, flops)
        rows.append([f"{flops:.1e}", fmt_si(params), fmt_si(tokens), f"{tokens / params:.1f}",
                     fmt_number(fit.predict(params, tokens))])
    return ["For a budget of C = 6 N D training FLOPs, the N and D that minimise the fitted loss:", "",
            *markdown_table(["compute C (FLOPs)", "N_opt", "D_opt", "tokens per parameter", "predicted loss"], rows)]


def _panel(fit: ScalingFit, along: str) -> Panel:
    """Observed loss against `along` (params or tokens), with the fitted curve at a few values of the other."""
    other = "tokens" if along == "params" else "params"
    xs = [getattr(p, along) for p in fit.points]
    curves = [Curve("runs", xs, [p.loss for p in fit.points], "o", "black")]
    varies = fit.A is not None if along == "params" else fit.B is not None
    if varies:
        span = torch.logspace(math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5), 60).tolist()
        for index, level in enumerate(_levels([getattr(p, other) for p in fit.points])):
            values = [fit.predict(**{along: x, other: level}) for x in span]
            label = f"fit, {'D' if other == 'tokens' else 'N'} = {fmt_si(level)}"
            curves.append(Curve(label, span, values, "-", f"C{index}"))
    xlabel = "parameters N" if along == "params" else "tokens D"
    return Panel(f"Loss against {xlabel}", xlabel, "validation loss (nats / token)", curves, log_x=True)


def _levels(values: list[float]) -> list[float]:
    """At most three representative values: the smallest, the middle and the largest distinct one."""
    distinct = sorted(set(values))
    return distinct if len(distinct) <= 3 else [distinct[0], distinct[len(distinct) // 2], distinct[-1]]
