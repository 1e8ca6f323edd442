"""Which ONNX Runtime build is installed, and what to tell a user when it is none or both.

edgemeta asks for ONNX Runtime through an extra, ``edgemeta[cpu]`` (``onnxruntime``, 24 MB) or
``edgemeta[gpu]`` (``onnxruntime-gpu``, 256 MB), because pip cannot pick a build by the hardware it
installs on. The two distributions install the same ``onnxruntime`` package and overwrite each
other's files, so having both is a silent mis-install (CUDA missing from a GPU machine, or a
broken import) that is worth a loud warning.

>>> "edgemeta[cpu]" in MISSING
True
"""

from __future__ import annotations

from importlib import metadata

DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")

MISSING = ("ONNX Runtime is not installed: pip install 'edgemeta[cpu]' (24 MB), or 'edgemeta[gpu]' "
           "(onnxruntime-gpu, 256 MB) on a machine with an NVIDIA GPU; with the source tree, "
           "pip install -c constraints.txt -e '.[cpu]'")


def installed(path: list[str] | None = None) -> list[str]:
    """The ONNX Runtime distributions found on ``path`` (default: ``sys.path``)."""
    found = []
    for name in DISTRIBUTIONS:
        dists = metadata.distributions(name=name, path=path) if path is not None else \
            metadata.distributions(name=name)
        if any(True for _ in dists):
            found.append(name)
    return found


def conflict(path: list[str] | None = None) -> str | None:
    """A warning when both builds are installed; None when there is at most one."""
    if len(installed(path)) < 2:
        return None
    return ("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files, "
            "so the build that answers is whichever was installed last. Keep one: pip uninstall -y "
            "onnxruntime onnxruntime-gpu, then pip install 'edgemeta[cpu]' or 'edgemeta[gpu]'")


def is_missing(exc: BaseException) -> bool:
    """True when ``exc`` is the import of ONNX Runtime failing because no build is installed."""
    return isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "onnxruntime"
