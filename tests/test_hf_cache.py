"""quanteval.hf_cache: transformers' cache module imported without hqq, its HQQ KV cache still working.

Each check runs in a fresh interpreter: this test process has imported transformers long before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what a sweep's process does first: import the generation engine, then load the embedded model
LOADS = r"""
import json, sys
import torch
import quanteval.generate
from quanteval.config import ModelConfig
from quanteval.models import load_model
loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
with torch.no_grad():
    loaded.model(torch.tensor([[1, 2, 3]]))
print(json.dumps({m: m in sys.modules for m in ("hqq", "hqq.core.quantize", "transformers.cache_utils")}))
"""

# transformers' HQQ-quantised KV cache layer: three updates; keys/values returned and kept, saved to argv[2]
HQQ_LAYER = r"""
import sys, torch
if sys.argv[1] == "hf_cache":
    from quanteval import hf_cache
    cache_utils = hf_cache.load()
    assert "hqq" not in sys.modules
else:
    import transformers.cache_utils as cache_utils
    assert "hqq" in sys.modules
layer = cache_utils.HQQQuantizedLayer(nbits=4, q_group_size=64, residual_length=2)
g = torch.Generator().manual_seed(0)
out = []
for n in (5, 1, 1, 1):  # a prefill, then decode steps: past residual_length the cache is re-quantised
    k, v = torch.randn(2, 3, n, 64, generator=g), torch.randn(2, 3, n, 64, generator=g)
    out += list(layer.update(k, v))
out += [cache_utils.HQQQuantizer.dequantize(*layer._quantized_keys)]
torch.save(out, sys.argv[2])
print(type(cache_utils.HQQQuantizer).__name__)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_loading_a_model_does_not_import_hqq():
    pytest.importorskip("hqq")  # installed by the [methods] extra, as in CI: without it there is nothing to avoid
    seen = json.loads(_python(LOADS).stdout.strip().splitlines()[-1])
    assert seen["transformers.cache_utils"]  # the model's classes did import transformers' cache module
    assert not seen["hqq"] and not seen["hqq.core.quantize"]


def test_transformers_hqq_kv_cache_unchanged(tmp_path):
    """transformers' HQQQuantizedLayer gives the same keys and values (bit for bit) when its module was
    imported through hf_cache (hqq imported at its first use) as when it imported hqq itself."""
    pytest.importorskip("hqq")
    plain, deferred = tmp_path / "plain.pt", tmp_path / "deferred.pt"
    assert _python(HQQ_LAYER, "plain", str(plain)).stdout.split()[-1] == "type"  # hqq's Quantizer class
    assert _python(HQQ_LAYER, "hf_cache", str(deferred)).stdout.split()[-1] == "_Deferred"
    import torch

    a, b = torch.load(plain), torch.load(deferred)
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the cache did quantise: a decode step returns the prefill's keys as 4-bit values, not as given
    first, later = a[0], a[2][:, :, :5]
    assert 0 < float((later - first).abs().max()) < 0.5


def test_load_is_a_no_op_once_imported():
    from quanteval import hf_cache

    import transformers.cache_utils

    assert hf_cache.load() is transformers.cache_utils
