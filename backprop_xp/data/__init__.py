"""The data a network learns from: MNIST (and Fashion-MNIST) from the IDX files to shuffled batches on the backend.

In the order data flows through it:

* ``idx.py``: ``read_idx`` reads one IDX file (the format MNIST ships in),
  gzip-compressed or not, and refuses anything it does not fully understand;
* ``download.py``: the files' names, their SHA-256 and the public mirrors;
  ``fetch_mnist`` fills a per-user cache, checking every download;
* ``datasets.py``: ``load_mnist``/``load_dataset`` find the four files, check
  that they fit together and return float32 images in [0, 1] and int64
  labels; ``train_val_split`` holds a validation set out;
* ``batches.py``: ``Minibatches`` moves a set to the backend once and serves
  shuffled batches gathered there;
* ``augment.py``: random shifts, rotations and elastic distortions;
* ``preprocess.py``: ``deskew`` and the other preprocessings a run applies to every image;
* ``images.py``: a user's picture made to look like an MNIST digit (``predict``).
"""

from .batches import Minibatches, epoch_permutation
from .datasets import load_dataset, load_mnist, train_val_split
from .download import DATASETS, FILES, SHA256, ChecksumError, DownloadError, cache_dir, download_file, fetch_mnist
from .idx import DataFormatError, read_idx

__all__ = [
    "DATASETS", "FILES", "SHA256", "ChecksumError", "DataFormatError", "DownloadError", "Minibatches", "cache_dir", "download_file",
    "epoch_permutation", "fetch_mnist", "load_dataset", "load_mnist", "read_idx", "train_val_split",
]  # fmt: skip
