"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. ``OPS`` maps each op name that has a Triton form to
(function, supported dtypes); the function has the signature of the public op.

In a source checkout this folder is also importable as a top-level package ``kernels``
whenever the checkout's root is on ``sys.path`` (``python -m pytest`` run from the root, for
one), and libraries probe for Hugging Face's package of that name by importing it
(transformers does, on importing its GPT-2 model). Under any name but ``fastlm.kernels`` the
package therefore defines nothing, and its modules refuse to load (``_name.py``): running them
a second time would define the Triton ops again under the same names, and torch then drops the
first definitions while ``fastlm.kernels`` still calls them (a dangling operator handle: wrong
results, ``std::bad_alloc`` or a crash, depending on what reused the memory). And where a
package of that name is installed (Hugging Face's ``kernels``, which transformers then imports
for its hub kernels), the import is handed over to it: this folder must not shadow it.
"""
import os
import sys

from ._name import PACKAGE

OPS: dict = {}


def _hand_over_top_level_name() -> None:
    """Imported as the top-level ``kernels``: load the installed package of that name, if any,
    in this module's place (the import statement returns ``sys.modules["kernels"]``)."""
    import importlib.machinery
    import importlib.util

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _hand_over_top_level_name()

if __name__ == PACKAGE:
    import torch

    from . import loss as _loss
    from . import norms as _norms
    from .attention import attention as _attention, decode_attention as _decode_attention

    _DTYPES = (torch.float32, torch.bfloat16, torch.float16)

    OPS = {
        "layer_norm": (_norms.layer_norm, _DTYPES),
        "rms_norm": (_norms.rms_norm, _DTYPES),
        "linear_cross_entropy": (_loss.linear_cross_entropy, _DTYPES),
        "attention": (_attention, _DTYPES),
        "decode_attention": (_decode_attention, _DTYPES),
    }
