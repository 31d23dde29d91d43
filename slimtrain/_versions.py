"""The version ranges of the dependencies whose internals slimtrain reads (PEFT, DeepSpeed)."""

from __future__ import annotations

from packaging.version import Version


def version_spec(package: str, supported: tuple[Version, Version]) -> str:
    """The pip requirement of ``supported`` (``[lower, upper)``): ``peft>=0.18,<0.22``."""
    return f"{package}>={supported[0]},<{supported[1]}"


def check_version(package: str, version: str, supported: tuple[Version, Version], user: str, reads: str) -> None:
    """Raise ``ImportError`` unless ``version`` of ``package`` (pre-releases and local builds by their release) is
    in ``supported``; the message names ``user`` (the slimtrain module), what it ``reads`` of the package's
    internals, and the range to install."""
    spec = version_spec(package, supported)
    if not (supported[0] <= Version(Version(version).base_version) < supported[1]):
        raise ImportError(
            f"{user} supports {spec}, found {package}=={version}. {reads}; install a supported version: "
            f"pip install '{spec}'."
        )
