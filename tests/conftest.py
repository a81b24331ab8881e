import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAXDNN_SHARED", REPO.parent / "shared"))
JPEG_ZIP = SHARED / "datasets" / "cifar10-jpeg.zip"
LOSSLESS_ZIP = SHARED / "datasets" / "cifar10-lossless-subset.zip"
MLPERF_H5 = SHARED / "models" / "mlperf-tiny-resnet8" / "pretrainedResnet.h5"


def need(path: Path):
    """Data the test needs: missing data fails the test (never a silent skip)."""
    if not path.exists():
        pytest.fail(f"{path} not found: set MAXDNN_SHARED to the folder holding datasets/ and models/ "
                    f"(see the README's Tests section)")
    return path


def one_line_error(r, *fragments):
    """A CLI result that is one 'maxdnn: error:' line with exit code 2, containing every fragment."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("maxdnn: error:"), r.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: the workers already fill the cores (oversubscription slows everything)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# decoded datasets are cached inside the checkout (ignored), never in the user's home;
# writes are atomic, so parallel workers may share it
os.environ["MAXDNN_CACHE"] = str(REPO / ".pytest_cache" / "maxdnn-data")
# the user's library of imported multipliers is never read or written by tests (they set their own)
os.environ["MAXDNN_MULTIPLIERS"] = str(REPO / ".pytest_cache" / "no-imported-multipliers")


@pytest.fixture(scope="session")
def lossless_test():
    from maxdnn.data import load_cifar10

    return load_cifar10(need(LOSSLESS_ZIP), "test")


@pytest.fixture(scope="session")
def qnet():
    """The committed model quantized with 1000 lossless-subset training images."""
    from maxdnn.data import load_cifar10
    from maxdnn.zoo.models import load_model
    from maxdnn.ir.quant import calibration_images
    from maxdnn.frontends.pytorch import quantize_module

    train = load_cifar10(need(LOSSLESS_ZIP), "train")
    return quantize_module(load_model(), calibration_images(train.images, 1000))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
