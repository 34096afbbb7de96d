"""The Chinchilla fit recovers a known law, the compute-optimal split is the closed form (and the minimum),
and runs that cannot identify five numbers fall back to L(N) and say so."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from binarylm.config import build_config
from binarylm.errors import BinaryLMError
from binarylm.eval.scaling import Point, ScalingFit, compute_optimal, fit_scaling_law, scaling_report
from binarylm.model import Transformer

LAW = dict(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # the Chinchilla paper's estimates


def law(params: float, tokens: float, E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28) -> float:
    return E + A / params ** alpha + B / tokens ** beta


def grid_points(sizes, budgets, noise: float = 0.0) -> list[Point]:
    rng = random.Random(0)
    return [Point(f"{n:g}x{d:g}", n, d, law(n, d) * (1 + rng.uniform(-noise, noise)))
            for n in sizes for d in budgets]


def assert_close(fit: ScalingFit, tolerance: float, **expected: float) -> None:
    for name, value in expected.items():
        assert getattr(fit, name) == pytest.approx(value, rel=tolerance), name


def test_fit_recovers_the_law_the_points_came_from():
    points = grid_points([1e6, 3e6, 1e7, 3e7, 1e8], [1e7, 1e8, 1e9, 1e10], noise=0.0005)
    fit = fit_scaling_law(points)
    assert fit.form == "L(N, D)" and fit.complete and fit.note == ""
    assert_close(fit, 0.05, **LAW)
    assert max(abs(fit.predict(p.params, p.tokens) / p.loss - 1) for p in points) < 0.002


def test_compute_optimal_is_the_closed_form_and_the_minimum_on_the_budget():
    fit = ScalingFit(**LAW, form="L(N, D)", note="", points=[], objective=0.0)
    flops = 5.76e23  # Chinchilla's budget
    params, tokens = compute_optimal(fit, flops)
    a, b = LAW["alpha"], LAW["beta"]
    g = (a * LAW["A"] / (b * LAW["B"])) ** (1 / (a + b))
    assert params == pytest.approx(g * (flops / 6) ** (b / (a + b)), rel=1e-12)
    assert 6 * params * tokens == pytest.approx(flops, rel=1e-12)
    best = fit.predict(params, tokens)
    for factor in (0.8, 0.95, 1.05, 1.25):  # any other split of the same budget does worse
        assert fit.predict(params * factor, tokens / factor) > best
    small = compute_optimal(fit, flops / 1e4)  # the ratio moves with the budget when alpha != beta
    assert small[1] / small[0] != pytest.approx(tokens / params, rel=0.01)


def test_one_token_count_for_every_run_falls_back_to_loss_against_size_and_says_so():
    points = grid_points([1e6, 3e6, 1e7, 3e7, 1e8, 3e8], [1e9])
    fit = fit_scaling_law(points)
    assert fit.form == "L(N)" and not fit.complete and fit.B is None and fit.beta is None
    assert "every run has the same D = 1e+09" in fit.note and "no compute-optimal split" in fit.note
    assert_close(fit, 0.02, E=LAW["E"] + LAW["B"] / 1e9 ** LAW["beta"], A=LAW["A"], alpha=LAW["alpha"])
    with pytest.raises(BinaryLMError, match="needs the full L\\(N, D\\) fit"):
        compute_optimal(fit, 1e20)
    two_budgets = fit_scaling_law(grid_points([1e6, 1e7, 1e8], [1e8, 1e9]))
    assert two_budgets.form == "L(N)" and "only 2 different values of D" in two_budgets.note
    few = fit_scaling_law([Point("", n, d, law(n, d)) for n, d in ((1e6, 1e8), (1e7, 1e9), (1e8, 1e10), (1e9, 1e8))])
    assert few.form == "L(N)" and "only 4 runs" in few.note
    assert fit_scaling_law(grid_points([1e7], [1e7, 1e8, 1e9])).form == "L(D)"
    with pytest.raises(BinaryLMError, match="at least 3 model sizes"):
        fit_scaling_law(grid_points([1e6, 1e7], [1e8]))


def make_run(root: Path, d_model: int, n_layer: int, tokens: int) -> Path:
    """A pretraining run's config.json and metrics.jsonl, its validation loss on the law."""
    run = root / f"d{d_model}-l{n_layer}-t{tokens}"
    config = build_config({"model": {"n_layer": n_layer, "n_head": 2, "d_model": d_model, "context_length": 16,
                                     "vocab_size": 256}, "train": {"out_dir": str(run)}})
    params = Transformer(config.model).num_parameters()
    loss = law(params, tokens, E=1.8, A=40.0, B=60.0)
    (run / "ckpt-000100").mkdir(parents=True)
    (run / "ckpt-000100" / "config.json").write_text(json.dumps(config.to_dict()))
    (run / "latest").write_text("ckpt-000100\n")
    records = [{"step": 100, "split": "train", "time": 9.0, "loss": loss - 0.1, "lr": 1e-4, "grad_norm": 0.5,
                "tokens_per_sec": 1e4, "tokens": tokens},
               {"step": 100, "split": "val", "time": 9.5, "loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": 1.0, "tokens": tokens}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_scaling_report_reads_runs_and_writes_the_fit_the_split_and_a_plot(tmp_path):
    runs = [make_run(tmp_path / "runs", d_model, n_layer, tokens)
            for d_model, n_layer in ((16, 1), (32, 2), (64, 3)) for tokens in (100_000, 1_000_000, 10_000_000)]
    text = scaling_report(runs, tmp_path / "out", budgets=[1e12, 1e14])
    assert "Fitted L(N, D) to 9 runs" in text and "Fallback" not in text
    assert "| compute C (FLOPs) | N_opt | D_opt | tokens per parameter | predicted loss |" in text
    assert "| 1.0e+12 |" in text and "![scaling](scaling.png)" in text
    assert "| alpha | 0.34 |" in text and "| beta | 0.28 |" in text  # the law the runs were written from
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "scaling.md").read_text() == text and (tmp_path / "out" / "scaling.html").is_file()
    assert "Extrapolation" not in text
    far = scaling_report(runs, tmp_path / "far", budgets=[1e12, 1e19])
    assert "**Extrapolation:**" in far and "1e+19" in far and "1e+12" not in far.split("**Extrapolation:**")[1]
    fallback = scaling_report(runs[::3], tmp_path / "same-d")
    assert "**Fallback:**" in fallback and "only 3 runs" in fallback and "Not available" in fallback
    with pytest.raises(BinaryLMError, match="validation loss"):
        scaling_report([tmp_path / "runs"], tmp_path / "none")
