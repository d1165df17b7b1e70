"""slmkit: fine-tune a small language model with Olive and ship it as an int4 ONNX model."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional kernel from the model hub and warns when it cannot;
# it then uses its own CPU code, which is what slmkit measured. Keep that warning out of every stage's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load(path, **kwargs):
    """Load a model folder written by the pipeline: `slmkit.load("artifacts/quantize/model").classify([...])`.

    The pipeline's int4 model loads once the parity gate passed it (`ungated=True` loads it anyway).
    """
    from slmkit.inference import load as _load

    return _load(path, **kwargs)
