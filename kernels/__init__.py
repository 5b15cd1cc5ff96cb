"""fastlm.kernels: Triton kernels, installed as the subpackage ``fastlm.kernels``.

Import only through ``fastlm.ops``. ``OPS`` maps each op name that has a Triton form to
(function, supported dtypes); the function has the signature of the public op.
"""
OPS: dict = {}
