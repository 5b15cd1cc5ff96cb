"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. ``OPS`` maps each op name that has a Triton form to
(function, supported dtypes); the function has the signature of the public op.
"""
import torch

from . import loss as _loss
from . import norms as _norms

OPS: dict = {}

_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS["layer_norm"] = (_norms.layer_norm, _NORM_DTYPES)
OPS["rms_norm"] = (_norms.rms_norm, _NORM_DTYPES)
OPS["linear_cross_entropy"] = (_loss.linear_cross_entropy, (torch.float32, torch.bfloat16, torch.float16))
