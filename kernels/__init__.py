"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. The modules hold Triton kernels and their launchers, each
launcher a custom op ``torch.ops.fastlm_triton.<name>`` with the schema of the C++ op of that
name (csrc/ops.cpp); the public ops, their choice of backend and their autograd glue are in
``fastlm/ops/<op>.py``. ``OPS`` maps each custom op name defined here to its launcher.

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
    from . import attention as _attention
    from . import loss as _loss
    from . import norms as _norms

    OPS = {name: getattr(module, name) for module, names in (
        (_attention, ("attention_fwd", "attention_bwd", "decode_attention")),
        (_norms, ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd")),
        (_loss, ("linear_cross_entropy_fwd", "linear_cross_entropy_bwd")),
    ) for name in names}
