"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. ``OPS`` maps each op name that has a Triton form to
(function, supported dtypes); the function has the signature of the public op.
"""
import torch

from . import loss as _loss
from . import norms as _norms
from .attention import attention as _attention, decode_attention as _decode_attention

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

OPS: dict = {
    "layer_norm": (_norms.layer_norm, _DTYPES),
    "rms_norm": (_norms.rms_norm, _DTYPES),
    "linear_cross_entropy": (_loss.linear_cross_entropy, _DTYPES),
    "attention": (_attention, _DTYPES),
    "decode_attention": (_decode_attention, _DTYPES),
}
