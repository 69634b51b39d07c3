"""Make the reference libraries' torchvision importable beside the CPU torch build.

PyPI's torchvision 0.28 (the release paired with torch 2.13, a reference-only dependency of
EasyOCR) is built against CUDA torch: its compiled ops cannot load next to torch 2.13.0+cpu,
and `import torchvision` then fails in `_meta_registrations.py` on
`register_fake("torchvision::nms")`. transformers imports torchvision whenever it is installed,
so every parity test would fail with it. No reference we run calls a torchvision op (EasyOCR
builds `vgg16_bn` layers and uses `ToTensor`; transformers' text and vision models use none),
so declaring the two op schemas it registers fakes for (no kernels: calling them fails
loudly) is enough. Imported first by tests/conftest.py and by bench scripts that load
EasyOCR; a torchvision whose ops load is left alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.library

_LIBRARY: Any = None  # kept alive: the schemas live as long as this object


def declare_missing_ops() -> None:
    global _LIBRARY
    if _LIBRARY is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    try:
        import torchvision  # noqa: F401  (a build whose ops load needs nothing from us)

        return
    except ImportError:
        return  # not installed: nothing imports it
    except RuntimeError:
        pass  # the CUDA build's ops did not load; declare them and import again below
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if not hasattr(torch.ops.torchvision, "nms"):
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
