"""The one name the Triton kernel modules may be loaded under (see ``kernels/__init__.py``)."""

PACKAGE = "fastlm.kernels"


def require_package_name(module_name: str) -> None:
    """Refuse to load a kernel module under any name but ``fastlm.kernels.<module>``."""
    if not module_name.startswith(PACKAGE + "."):
        short = module_name.rsplit(".", 1)[-1]
        raise ImportError(
            f"{module_name} is fastlm's Triton module {PACKAGE}.{short} loaded under another name; use it "
            f"through fastlm.ops (loading it twice would define its torch ops twice)")
