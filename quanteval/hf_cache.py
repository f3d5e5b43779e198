"""transformers' KV-cache module, imported without importing hqq.

``transformers.cache_utils`` (imported by every transformers causal LM, and by ``quanteval.generate``)
runs ``from hqq.core.quantize import Quantizer`` at its top whenever hqq is installed, as it is with
quanteval's ``[methods]`` extra. transformers needs it for one class only, ``HQQQuantizedLayer`` (an
HQQ-quantised KV cache, which quanteval does not use: see ``quanteval.kvcache``). hqq's module decorates
a method with ``torch.compile()`` as it is defined, and that call loads the rest of ``torch._dynamo``
(its trace rules, networkx: some 550 modules in all) in every process that loads a model, whatever its
method: 0.7 s and 42 MiB of resident memory per process (``python benchmarks/import_cost.py``: a Llama
model class imported in fresh processes, 4.11 s against 4.84 s and 456 against 497 MiB, medians of five,
2026-12-07, transformers 5.25, hqq 0.2.8.post1, 2 idle cores).

``load()`` imports ``cache_utils`` with transformers' hqq check answering False for the duration of that
import, then puts the real check back and binds the module's ``HQQQuantizer`` to a stand-in that imports
hqq's ``Quantizer`` at its first use. So transformers' HQQ KV cache still works, and hqq is imported only
where it is used (``method=hqq``, that cache). Once per process; nothing is changed when ``cache_utils``
was already imported (then hqq already was) or hqq is not installed.

Call ``load()`` before the first import of a transformers model class: ``quanteval.models.load_model``,
``quanteval.generate`` and the artifact readers do. Written here because transformers has no switch for
its optional imports, and hqq's compiled method is not used by quanteval.

    >>> from quanteval import hf_cache
    >>> cache_utils = hf_cache.load()
    >>> hasattr(cache_utils, "DynamicCache")
    True
"""

from __future__ import annotations

import importlib
import sys


class _Deferred:
    """Stands for ``module.name`` and imports it at the first attribute read (``Quantizer.quantize``...)."""

    def __init__(self, module: str, name: str):
        self._where = (module, name)

    def __getattr__(self, attr: str):
        module, name = self._where
        return getattr(getattr(importlib.import_module(module), name), attr)

    def __repr__(self) -> str:
        return "<deferred %s.%s>" % self._where


def load():
    """``transformers.cache_utils``, imported without importing hqq when this process had not imported
    it yet (see the module docstring); returns the module."""
    name = "transformers.cache_utils"
    if name in sys.modules:
        return sys.modules[name]
    import transformers.utils as tu

    real = getattr(tu, "is_hqq_available", None)
    if real is None or not real():  # a transformers without the check, or no hqq: nothing to avoid
        return importlib.import_module(name)
    tu.is_hqq_available = lambda *args, **kwargs: False
    try:
        module = importlib.import_module(name)
    finally:
        tu.is_hqq_available = real
    module.is_hqq_available = real  # HQQQuantizedLayer checks it when it is made
    if not hasattr(module, "HQQQuantizer"):
        module.HQQQuantizer = _Deferred("hqq.core.quantize", "Quantizer")
    return module
