"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. ``OPS`` maps each op name that has a Triton form to
(function, supported dtypes); the function has the signature of the public op.
"""
OPS: dict = {}

import torch as _torch

from .attention import attention as _attention, decode_attention as _decode_attention

OPS["attention"] = (_attention, (_torch.float32, _torch.bfloat16, _torch.float16))
OPS["decode_attention"] = (_decode_attention, (_torch.float32, _torch.bfloat16, _torch.float16))
