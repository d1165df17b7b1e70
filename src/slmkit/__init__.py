"""slmkit: fine-tune a small language model with Olive and ship it as an int4 ONNX model."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model folder written by the pipeline: `slmkit.load("artifacts/quantize/model").classify([...])`."""
    from slmkit.inference import load as _load

    return _load(path, **kwargs)
