"""backprop-xp: a one-hidden-layer network on MNIST, backpropagation derived by hand.

The same forward/backward/update code runs on NumPy (CPU) and CuPy (CUDA GPU);
choose with ``backend=``. Quick start::

    import backprop_xp as bx
    x_train, y_train, x_test, y_test = bx.load_mnist()
    m = bx.MLP(784, 128, 10, backend="auto")
    loss, grads = m.loss_and_grads(x_train[:128], y_train[:128])
"""

from .backend import Backend, BackendError, get_backend, to_numpy
from .data import DataFormatError, Minibatches, load_mnist
from .kernels import softmax_cross_entropy
from .model import MLP
from .optim import SGD, sgd_update

__version__ = "0.1.0"


__all__ = [
    "MLP",
    "Minibatches",
    "SGD",
    "Backend",
    "BackendError",
    "DataFormatError",
    "get_backend",
    "load_mnist",
    "sgd_update",
    "softmax_cross_entropy",
    "to_numpy",
    "__version__",
]
