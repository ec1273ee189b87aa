"""Print the worst relative error between backprop and central finite differences.

    python scripts/gradcheck.py

Float64, every parameter of a 7-5-4 network on a batch of 6, every activation,
plus softmax_cross_entropy's gradient with respect to its logits.
"""

from __future__ import annotations

import numpy as np

import backprop_xp as bx
from backprop_xp.activations import ACTIVATIONS
from backprop_xp.gradcheck import numeric_gradient, relative_error


def main() -> None:
    worst = 0.0
    for activation in ACTIVATIONS:
        rng = np.random.default_rng(100)
        m = bx.MLP(7, 5, 4, activation=activation, dtype="float64", seed=0)
        m.params["b1"][...] = rng.normal(scale=0.5, size=5)
        m.params["b2"][...] = rng.normal(scale=0.5, size=4)
        x, y = rng.normal(size=(6, 7)), rng.integers(0, 4, size=6)
        _, grads = m.loss_and_grads(x, y)
        for name in grads:
            err = relative_error(
                numeric_gradient(lambda m=m, x=x, y=y: m.loss_and_grads(x, y)[0], m.params[name]), grads[name]
            )
            worst = max(worst, err)
            print(f"{activation:8s} {name:3s} relative error {err:.2e}")
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(6, 10)), rng.integers(0, 10, size=6)
    _, analytic = bx.softmax_cross_entropy(z, y)
    err = relative_error(numeric_gradient(lambda: bx.softmax_cross_entropy(z, y)[0], z), analytic)
    worst = max(worst, err)
    print(f"softmax_cross_entropy dlogits relative error {err:.2e}")
    print(f"worst relative error: {worst:.2e}")


if __name__ == "__main__":
    main()
