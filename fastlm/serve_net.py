"""Former home of the server's connection limits, kept so that ``fastlm.serve_net`` imports
keep working: they are now ``fastlm.serve.net``."""
from .serve.net import LOOPBACK_NAMES, DeadlineStreamingResponse, HostCheck, host_name, is_loopback, protocol_class

__all__ = ["LOOPBACK_NAMES", "DeadlineStreamingResponse", "HostCheck", "host_name", "is_loopback", "protocol_class"]
