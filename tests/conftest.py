"""Shared fixtures: a tiny random Llama with its own tokenizer, and synthetic data, all offline."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every quanteval job takes its share of the cores (quanteval.threads): cores / live quanteval jobs. The
# pytest process registers itself once a test runs a job in-process, and then sits idle while the CLI
# subprocesses of later tests work, which would halve their threads. The suite pins the share to every
# core, as torch's default; tests/test_threads.py checks the shares themselves with explicit environments.
os.environ.setdefault("QUANTEVAL_THREADS", str(len(os.sched_getaffinity(0))))
WORDS = ("the a of to and in is was for on that with as by at from his her it he she they model "
         "river city king war game team song album film north south early later first second "
         "year years time people new old one two three four five six seven eight nine ten").split()


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SHARED_DATA = REPO.parent / "shared" / "data"
GENERATIVE_FILES = ("gsm8k/test.jsonl", "dialogsum/test.jsonl", "ifeval/input_data.jsonl", "mt_bench/question.jsonl",
                    "gsm8k/train.jsonl")  # train: the chat half of the default calibration mix


def synthetic_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + " .")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-block random Llama and a small BPE tokenizer saved as a local transformers directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(synthetic_text(400, 1).splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data directory with synthetic WikiText-2-shaped files (test and validation)."""
    d = tmp_path_factory.mktemp("data")
    (d / "wikitext2").mkdir()
    (d / "wikitext2" / "test.txt").write_text(synthetic_text(300, 2))
    (d / "wikitext2" / "valid.txt").write_text(synthetic_text(300, 3))
    for rel in GENERATIVE_FILES:  # the first rows of the real sets (read from ../shared/data, never copied into the repo)
        src = SHARED_DATA / rel
        if src.exists():
            (d / rel).parent.mkdir(exist_ok=True)
            (d / rel).write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8")
    return d


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (reproducible floats; on tiny tensors a
    second thread only adds spin-wait overhead, 10-100x slower on a busy machine)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    with torch_threads(1):
        yield


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cli: str = "quanteval") -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (Hydra and all)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    fn = {"quanteval": "main", "quanteval-report": "report_main"}[cli]
    code = f"import sys; sys.argv[0] = {cli!r}; from quanteval.cli import {fn}; sys.exit({fn}())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def load_lm_eval_task(name: str, **metadata):
    """lm-eval's own task object for ``tasks/<name>.yaml``, loaded through its TaskManager."""
    from lm_eval.tasks import TaskManager

    from quanteval_tasks import TASK_DIR

    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata or None)
    return tm.load(f"quanteval_{name}")["tasks"][f"quanteval_{name}"]


def talking(model, tok, seed: int = 0):
    """A random untied output layer with spread-out logits, EOS in place of one common word (so rows end
    at different steps): a tiny model whose greedy answers are words, not one repeated token."""
    import torch

    model.config.tie_word_embeddings = False
    w = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))  # (vocab, hidden)
    word = tok.convert_tokens_to_ids("Ġthe")
    w[tok.eos_token_id] = 1.02 * w[word]
    model.lm_head.weight = torch.nn.Parameter(w)
    return model.eval()
