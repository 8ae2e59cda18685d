"""The `tiny` model of ems.tools.build_model, built once per test session for tests without vLLM.

tests/vllm_helpers.py has the same helper, but importing it imports vLLM, which takes several
seconds.
"""
from ems.tools.build_model import build

_BUILT = {}


def tiny_model(tmp_path_factory):
    """Return (directory, build info) of the `tiny` preset with seed 0, built on first use."""
    if "tiny" not in _BUILT:
        outdir = str(tmp_path_factory.mktemp("tiny-model"))
        _BUILT["tiny"] = (outdir, build(outdir, preset="tiny", seed=0))
    return _BUILT["tiny"]
