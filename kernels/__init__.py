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
results, ``std::bad_alloc`` or a crash, depending on what reused the memory).
"""
from ._name import PACKAGE

OPS: dict = {}

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
