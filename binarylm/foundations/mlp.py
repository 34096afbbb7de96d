"""A multilayer perceptron in NumPy, with backpropagation written out by hand.

    x (N, d_0) -> [linear -> activation] x (L - 1) -> linear -> logits (N, d_L) -> softmax cross-entropy

Layer l computes z_l = a_l @ W_l + b_l from its input a_l (a_0 = x); hidden layers pass
a_{l+1} = f(z_l) on, and the last layer's z is the logits. `backward` runs the chain rule
from the loss back to every W_l and b_l; `gradient_check` compares its answers with
central finite differences, so a wrong line of calculus cannot hide.

    mlp = MLP.init([2, 16, 2], activation="tanh")
    for step in range(500):
        loss = train_step(mlp, x, targets, lr=0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _tanh_derivative(z: np.ndarray) -> np.ndarray:
    return 1.0 - np.tanh(z) ** 2  # d tanh(z) / dz = 1 - tanh(z)^2


def _relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


def _relu_derivative(z: np.ndarray) -> np.ndarray:
    return (z > 0).astype(z.dtype)  # 1 where z > 0, else 0 (the kink at 0 gets 0)


# name -> (f(z), f'(z)), both elementwise
ACTIVATIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "tanh": (np.tanh, _tanh_derivative),
    "relu": (_relu, _relu_derivative),
}

# What a layer hands to the backward pass: its input a_l (N, d_l) and its pre-activation z_l (N, d_{l+1}).
LayerCache = tuple[np.ndarray, np.ndarray]


@dataclass
class MLP:
    """The parameters: weights[l] is W_l with shape (d_l, d_{l+1}), biases[l] is b_l with shape (d_{l+1},)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activation: str = "tanh"

    @classmethod
    def init(cls, sizes: list[int], activation: str = "tanh", seed: int = 0) -> MLP:
        """Random weights scaled by 1/sqrt(fan_in) (sqrt(2/fan_in) for ReLU), zero biases.

        `sizes` lists the widths [d_0, d_1, ..., d_L]: inputs, hidden layers, classes.
        """
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output width, got {sizes}")
        rng = np.random.default_rng(seed)
        gain = 2.0 if activation == "relu" else 1.0
        weights = [rng.normal(0.0, np.sqrt(gain / fan_in), size=(fan_in, fan_out))
                   for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]
        biases = [np.zeros(fan_out) for fan_out in sizes[1:]]
        return cls(weights, biases, activation)

    def parameters(self) -> list[np.ndarray]:
        """[W_0, b_0, W_1, b_1, ...]: the arrays themselves (not copies), in the order gradients use."""
        return [array for pair in zip(self.weights, self.biases) for array in pair]


def forward(mlp: MLP, x: np.ndarray) -> tuple[np.ndarray, list[LayerCache]]:
    """The logits (N, d_L) for inputs x (N, d_0), and each layer's (a_l, z_l) for `backward`."""
    f, _ = ACTIVATIONS[mlp.activation]
    last = len(mlp.weights) - 1
    cache: list[LayerCache] = []
    a = x  # (N, d_0)
    for layer, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        z = a @ w + b  # (N, d_l) @ (d_l, d_{l+1}) + (d_{l+1},) -> (N, d_{l+1})
        cache.append((a, z))
        a = z if layer == last else f(z)  # the last layer has no activation: its z are the logits
    return a, cache


def softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean negative log-likelihood of the target classes, and its gradient with respect to the logits.

        p      = softmax(logits) per row                              (N, d_L)
        loss   = -(1/N) sum_n log p[n, y_n]
        dlogit = (p - onehot(y)) / N                                  (N, d_L)

    logits: (N, d_L); targets: (N,) class indices.
    """
    n_rows = len(targets)
    rows = np.arange(n_rows)
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, d_L); the max is subtracted so exp cannot overflow
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N, d_L)
    loss = -log_probs[rows, targets].mean()
    dlogits = np.exp(log_probs)  # p: (N, d_L)
    dlogits[rows, targets] -= 1.0  # p - onehot(y)
    return float(loss), dlogits / n_rows


def backward(mlp: MLP, cache: list[LayerCache], dlogits: np.ndarray) -> list[np.ndarray]:
    """The loss's gradients for [W_0, b_0, W_1, b_1, ...], by the chain rule from the last layer back.

    dlogits: dloss/dlogits (N, d_L), as `softmax_cross_entropy` returns it.
    """
    _, f_prime = ACTIVATIONS[mlp.activation]
    grads: list[np.ndarray] = []
    dz = dlogits  # dL/dz_l for the last layer, whose z are the logits: (N, d_L)
    for layer in reversed(range(len(mlp.weights))):
        a, _ = cache[layer]
        # z_l = a_l @ W_l + b_l, hence:
        dw = a.T @ dz  # dL/dW_l = a_l^T dL/dz_l:  (d_l, N) @ (N, d_{l+1}) -> (d_l, d_{l+1})
        db = dz.sum(axis=0)  # dL/db_l = sum over rows of dL/dz_l:  (N, d_{l+1}) -> (d_{l+1},)
        grads[:0] = [dw, db]
        if layer > 0:
            da = dz @ mlp.weights[layer].T  # dL/da_l = dL/dz_l W_l^T:  (N, d_{l+1}) @ (d_{l+1}, d_l) -> (N, d_l)
            _, z_below = cache[layer - 1]
            dz = da * f_prime(z_below)  # a_l = f(z_{l-1}) elementwise: dL/dz_{l-1} = dL/da_l * f'(z_{l-1}), (N, d_l)
    return grads


def loss(mlp: MLP, x: np.ndarray, targets: np.ndarray) -> float:
    """The mean cross-entropy of the network on (x, targets): a forward pass only."""
    logits, _ = forward(mlp, x)
    return softmax_cross_entropy(logits, targets)[0]


def loss_and_gradients(mlp: MLP, x: np.ndarray, targets: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """A forward pass, the loss, and a backward pass: the loss and [dW_0, db_0, dW_1, db_1, ...]."""
    logits, cache = forward(mlp, x)
    value, dlogits = softmax_cross_entropy(logits, targets)
    return value, backward(mlp, cache, dlogits)


def sgd_step(mlp: MLP, grads: list[np.ndarray], lr: float) -> None:
    """Plain gradient descent, in place: p <- p - lr * dL/dp for every parameter."""
    for param, grad in zip(mlp.parameters(), grads):
        param -= lr * grad


def train_step(mlp: MLP, x: np.ndarray, targets: np.ndarray, lr: float) -> float:
    """One SGD step on the batch (x, targets); returns the loss before the step."""
    value, grads = loss_and_gradients(mlp, x, targets)
    sgd_step(mlp, grads, lr)
    return value


def predict(mlp: MLP, x: np.ndarray) -> np.ndarray:
    """The most likely class for each row of x: (N,) indices."""
    logits, _ = forward(mlp, x)
    return logits.argmax(axis=1)


# ---------------------------------------------------------------- checking the calculus


def numerical_gradients(mlp: MLP, x: np.ndarray, targets: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
    """Central differences, one parameter entry at a time: dL/dp ~ (L(p + eps) - L(p - eps)) / (2 eps).

    The error of the estimate shrinks as eps^2; use float64 parameters so that rounding stays far below it.
    """
    grads = []
    for param in mlp.parameters():
        grad = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            saved = param[index]
            param[index] = saved + eps
            loss_plus = loss(mlp, x, targets)
            param[index] = saved - eps
            loss_minus = loss(mlp, x, targets)
            param[index] = saved  # put it back exactly
            grad[index] = (loss_plus - loss_minus) / (2.0 * eps)
        grads.append(grad)
    return grads


def relative_error(analytic: np.ndarray, numerical: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||): near 0 when the two agree, 1 when they point in unrelated directions."""
    scale = np.linalg.norm(analytic) + np.linalg.norm(numerical)
    return float(np.linalg.norm(analytic - numerical) / scale) if scale > 0 else 0.0


def gradient_check(mlp: MLP, x: np.ndarray, targets: np.ndarray, eps: float = 1e-6) -> float:
    """The largest relative error, over all parameters, between `backward` and central differences."""
    _, analytic = loss_and_gradients(mlp, x, targets)
    numerical = numerical_gradients(mlp, x, targets, eps)
    return max(relative_error(a, n) for a, n in zip(analytic, numerical))
