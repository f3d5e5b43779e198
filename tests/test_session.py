"""The session restores the baseline weights from the model's own safetensors files, not a second copy."""

from __future__ import annotations

import torch

from quanteval.config import ModelConfig
from quanteval.models import load_model
from quanteval.session import BaseWeights


def test_baseline_weights_restore_from_the_files_with_no_copy_in_memory(tiny_model):
    loaded = load_model(ModelConfig(name="tiny", source="hf", name_or_path=str(tiny_model)), torch.device("cpu"),
                        torch.float32)
    model = loaded.model
    assert loaded.weight_files, "the tiny model is a local safetensors directory"
    want = {k: v.clone() for k, v in model.state_dict().items()}
    base = BaseWeights(model, loaded.weight_files)
    assert base.in_memory_bytes == 0  # every tensor is in the file (the tied lm_head with the embedding)
    assert "lm_head.weight" in base.tied
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # fake-quant weights in place
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # untied by a method
    base.restore(model)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_tensors_the_files_lack_are_kept_in_memory(tiny_model):
    loaded = load_model(ModelConfig(name="tiny", source="hf", name_or_path=str(tiny_model)), torch.device("cpu"),
                        torch.float32)
    base = BaseWeights(loaded.model, ())  # no files (a hub model): a copy of everything
    state = loaded.model.state_dict()
    assert base.in_memory_bytes == sum(v.numel() * v.element_size() for k, v in state.items() if k not in base.tied)
    want = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(0)
    base.restore(loaded.model)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in want.items())
