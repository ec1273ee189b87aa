"""backprop-xp: a one-hidden-layer network on MNIST, backpropagation derived by hand.

The same forward/backward/update code runs on NumPy (CPU) and CuPy (CUDA GPU);
choose with ``backend=``. Quick start: one call trains a run, as the ``train``
command does, and its folder holds the model::

    import backprop_xp as bx
    metrics = bx.train(bx.TrainConfig(hidden=128, epochs=3), "runs/quick")  # metrics.json, model.npz, pictures
    m = bx.MLP.load("runs/quick/model.npz")

What happens inside, by hand::

    x_train, y_train, x_test, y_test = bx.load_mnist()
    m = bx.MLP(784, 128, 10, backend="auto")
    opt = bx.SGD(m, lr=0.1, momentum=0.9)  # or bx.Adam(m, lr=1e-3), bx.AdamW, bx.Nesterov
    for xb, yb in bx.Minibatches(x_train, y_train, 128, xp=m.xp).epoch(0):
        m.loss_and_grads(xb, yb)
        opt.step()
    m.save("my-model.npz")  # what MLP.load reads
    step = bx.make_step(m, opt)  # those two lines as train runs them: fused where the machine allows
"""

from .backend import Backend, BackendError, get_backend, to_numpy
from .data import DataFormatError, Minibatches, load_mnist
from .loss import softmax_cross_entropy
from .model import MLP
from .optimizers import OPTIMIZERS, SGD, Adam, AdamW, Nesterov, sgd_update_
from .step import make_step
from .training import TrainConfig, train

__version__ = "0.1.0"


__all__ = [
    "MLP",
    "Minibatches",
    "SGD",
    "Nesterov",
    "Adam",
    "AdamW",
    "OPTIMIZERS",
    "TrainConfig",
    "Backend",
    "BackendError",
    "DataFormatError",
    "get_backend",
    "load_mnist",
    "make_step",
    "sgd_update_",
    "softmax_cross_entropy",
    "to_numpy",
    "train",
    "__version__",
]
