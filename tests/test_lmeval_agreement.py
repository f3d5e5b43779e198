"""quanteval agrees with lm-eval: the same text gets the same per-item scores, and greedy decoding
gives the same text as lm-eval's ``HFLM``.

Scoring (gsm8k, ifeval), two ways:

- through lm-eval's whole evaluator: ``ReplayLM`` answers each ``generate_until`` request with a
  prepared text, ``lm_eval.simple_evaluate`` scores it (``log_samples=True``), and every logged
  sample's metrics must equal ``score_items`` on the same text, filter by filter;
- against lm-eval's stock definitions, without our YAML: the filters and ``exact_match``
  settings of ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (gold = its ``doc_to_target``, the raw answer),
  and ``lm_eval.tasks.ifeval.utils.process_results``.

Each text is chosen to hit a corner of the scorers (no '####', '$1,234.', commas, U+FFFD, empty,
a wrong last number, a chatty first line that only the loose IFEval scores forgive), and each
test checks that both outcomes occur, so it cannot pass on all-zero scores.

Generation: ``quanteval.generate.generate`` (batched) and ``HFLM.generate_until`` (batch 1), both
greedy, on the same prompts (``prompt_for``) and stops, must return the same text: on the tiny
model (as saved, and made to talk), with a stop string that is a special token but not the
generation EOS, and (slow) on SmolLM2.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import lm_eval.evaluator
import nltk
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from quanteval.config import ModelConfig
from quanteval.data import resolve_data_dir
from quanteval.evaluate.generative import TaskSpec, lmeval_name, load_spec, prompt_for, score_items, stop_strings
from quanteval.generate import generate
from quanteval.models import load_model
from quanteval_tasks import TASK_DIR
from quanteval_tasks.ifeval import ensure_punkt

IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                  "inst_level_loose_acc")
GSM8K_FILTERS = ("strict-match", "flexible-extract")


class ReplayLM(LM):
    """An lm-eval model that answers ``generate_until`` with prepared texts, keyed by the doc's ``id``."""

    def __init__(self, texts: dict[str, str]):
        super().__init__()
        self.texts = texts
        self.requests: list[Instance] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.requests.extend(requests)
        return [self.texts[r.doc["id"]] for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ReplayLM only replays generations")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ReplayLM only replays generations")


@dataclass
class Scored:
    """One (doc, text): quanteval's ``score_items`` entry and lm-eval's logged sample per filter."""

    doc: dict
    text: str
    ours: dict
    samples: dict[str, dict]


def score_both(name: str, texts: dict[str, list[str]]) -> tuple[TaskSpec, list[Scored]]:
    """Score ``texts[doc id][round]`` with quanteval and, one evaluator run per round, with lm-eval.

    The docs are the task's first ``len(texts)`` docs, in order; every doc has the same number of texts.
    """
    data_root = resolve_data_dir(None)
    spec = load_spec(name, data_root, len(texts), None, {})
    assert [d["id"] for d in spec.docs] == list(texts)
    (rounds,) = {len(v) for v in texts.values()}
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(data_root)})
    scored = []
    for r in range(rounds):
        round_texts = {doc_id: v[r] for doc_id, v in texts.items()}
        replay = ReplayLM(round_texts)
        with pytest.MonkeyPatch.context() as mp:  # environment report only: `pip list` and more, ~1 s a run
            mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
            res = simple_evaluate(model=replay, tasks=[lmeval_name(name)], task_manager=tm, limit=len(texts),
                                  log_samples=True, bootstrap_iters=0)
        assert sorted(q.doc["id"] for q in replay.requests) == sorted(texts)  # one request per doc
        samples: dict[str, dict[str, dict]] = defaultdict(dict)
        for s in res["samples"][lmeval_name(name)]:
            samples[s["doc"]["id"]][s["filter"]] = s
        ours = score_items(spec, [round_texts[d["id"]] for d in spec.docs])
        for doc, q in zip(spec.docs, ours):
            scored.append(Scored(doc, round_texts[doc["id"]], q, samples[doc["id"]]))
    return spec, scored


def check_requests(spec: TaskSpec, scored: list[Scored]) -> None:
    """lm-eval asked for each doc with quanteval's prompt text, stop strings and token cap."""
    for s in scored:
        for sample in s.samples.values():
            ((prompt, gen_kwargs),) = sample["arguments"]
            assert prompt == spec.lm_task.doc_to_text(s.doc)
            assert gen_kwargs["until"] == spec.until and gen_kwargs["max_gen_toks"] == spec.max_new_tokens
            assert sample["resps"] == [[s.text]]


# ---------------------------------------------------------------- gsm8k scoring

GSM8K_DOCS = 6  # golds 18, 3, 70000, 540, 20, 64


def gsm8k_texts(gold: str) -> list[tuple[str, tuple[int, int]]]:
    """Answers for a doc whose answer is ``gold``, each with its hand-checked (strict, flexible) score."""
    n = int(gold)
    return [
        (f"She sells 16 - 3 - 4 = 9 eggs.\nSo she makes {n} dollars.\n#### {n}", (1, 1)),
        (f"So the answer is {n}.", (0, 1)),  # no '####'; the final '.' is ignored
        (f"#### {n + 1}", (0, 0)),  # wrong
        (f"In total she makes ${n:,}.", (0, 1)),  # '$70,000.': '$', ',' and the final '.' are ignored
        ("", (0, 0)),
        (f"\ufffd\ufffd #### {n}\ufffd", (1, 1)),  # invalid UTF-8 decoded as U+FFFD around the answer
        (f"The result is {n:,} in all.\n#### {n:,}", (1, 1)),  # thousands commas on both
        (f"#### {n}\nCheck: {n} + 1 = {n + 1}", (1, 0)),  # flexible takes the last number
        (f"It is {n}.0", (0, 0)),  # '18.0' is not '18'
        ("I am not sure.", (0, 0)),  # no number: both filters fall back to '[invalid]'
    ]


@pytest.fixture(scope="module")
def gsm8k_scored() -> tuple[TaskSpec, list[Scored]]:
    from quanteval_tasks.gsm8k import docs

    golds = {d["id"]: d["answer"].split("#### ")[-1] for d in docs()[:GSM8K_DOCS]}
    texts = {doc_id: [t for t, _ in gsm8k_texts(gold)] for doc_id, gold in golds.items()}
    return score_both("gsm8k", texts)


def test_gsm8k_evaluator_scores_equal_quanteval(gsm8k_scored):
    spec, scored = gsm8k_scored
    assert len(scored) == GSM8K_DOCS * len(gsm8k_texts("1"))
    check_requests(spec, scored)
    mismatches = []
    for s in scored:
        assert set(s.samples) == set(GSM8K_FILTERS)
        assert set(s.ours["scores"]) == {f"exact_match,{f}" for f in GSM8K_FILTERS}
        for f, sample in s.samples.items():
            theirs = (sample["exact_match"], sample["filtered_resps"][0])
            ours = (s.ours["scores"][f"exact_match,{f}"], s.ours["extracted"][f])
            if ours != theirs:
                mismatches.append((s.doc["id"], s.text, f, "quanteval", ours, "lm-eval", theirs))
    assert not mismatches
    for f in GSM8K_FILTERS:
        assert {s.ours["scores"][f"exact_match,{f}"] for s in scored} == {0.0, 1.0}


def test_gsm8k_hand_checked_scores(gsm8k_scored):
    _, scored = gsm8k_scored
    by_text = {(s.doc["id"], s.text): s.ours["scores"] for s in scored}
    for doc_id, gold in {s.doc["id"]: s.doc["answer"].split("#### ")[-1] for s in scored}.items():
        for text, (strict, flexible) in gsm8k_texts(gold):
            scores = by_text[(doc_id, text)]
            assert (scores["exact_match,strict-match"], scores["exact_match,flexible-extract"]) == (strict, flexible), \
                (doc_id, text)


@pytest.fixture(scope="module")
def stock_gsm8k():
    """``score(doc, text) -> {filter: (exact_match, filtered answer)}`` from lm-eval's stock gsm8k.yaml alone."""
    from lm_eval.api.registry import get_metric
    from lm_eval.filters import build_filter_ensemble
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml", resolve_func=False)
    assert cfg["doc_to_target"] == "{{answer}}"  # the gold is the raw answer, calculator notes and all
    ensembles = []
    for f in cfg["filter_list"]:
        steps = [(step["function"], {k: v for k, v in step.items() if k != "function"}) for step in f["filter"]]
        ensembles.append(build_filter_ensemble(f["name"], steps))
    (metric,) = cfg["metric_list"]
    assert metric["metric"] == "exact_match"
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    exact_match = get_metric("exact_match")

    def score(doc: dict, text: str) -> dict[str, tuple[float, str]]:
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0, metadata=("gsm8k", 0, 1))
        inst.resps = [text]
        for ens in ensembles:
            ens.apply([inst])
        return {name: (exact_match(references=[doc["answer"]], predictions=[resp], **kwargs)["exact_match"], resp)
                for name, resp in inst.filtered_resps.items()}

    return score


def test_gsm8k_scores_equal_stock_lmeval_definition(gsm8k_scored, stock_gsm8k):
    _, scored = gsm8k_scored
    mismatches = []
    for s in scored:
        stock = stock_gsm8k(s.doc, s.text)
        assert set(stock) == set(GSM8K_FILTERS)
        ours = {f: (s.ours["scores"][f"exact_match,{f}"], s.ours["extracted"][f]) for f in GSM8K_FILTERS}
        if ours != stock:
            mismatches.append((s.doc["id"], s.text, "quanteval", ours, "stock", stock))
    assert not mismatches
    assert {v for s in scored for v, _ in stock_gsm8k(s.doc, s.text).values()} == {0.0, 1.0}


# ---------------------------------------------------------------- ifeval scoring

# A compliant answer for each of the first 8 IFEval prompts (the instructions are in the comments).
IFEVAL_GOOD = {
    # no comma; 3 highlighted sections; at least 300 words
    "1000": "\n".join(f"*Section {i}* " + " ".join(["Raymond was a count of Tripoli and he ruled well"] * 11)
                      for i in (1, 2, 3)),
    # no comma
    "1001": "Good morrow traveller. Thou shalt first behold Tokyo and then fair Kyoto by the sea.",
    # at least 12 [placeholders]
    "1005": "Resume\n" + "\n".join(f"{field}: [{field.lower()}]" for field in (
        "Name", "Address", "Phone", "Email", "School", "Year", "Grade", "Skill", "Hobby", "Award", "Club",
        "Reference")),
    # repeat the request first; a <<title>>
    "1012": ("Write an email to my boss telling him that I am quitting. The email must contain a title wrapped "
             "in double angular brackets, i.e. <<title>>.\n<<Resignation>>\nDear boss, I am leaving next month."),
    # English, all lowercase
    "1019": "what are the two young boys with toy guns and horns going to do in the park this afternoon?",
    # exactly 3 markdown bullets
    "102": "* I love your ball gown tonight.\n* Thank you, my sweats are very comfortable.\n* Let us go to the event.",
    # English, all capitals; 2 sections labelled PARAGRAPH X
    "1021": ("PARAGRAPH 1\nTHE SENTENCE ASSUMES THAT EVERY PERSON CAN JUDGE WHICH LAWS ARE BAD.\n"
             "PARAGRAPH 2\nBREAKING A LAW STILL HAS CONSEQUENCES FOR EVERYONE IN THE COMMUNITY."),
    # fewer than 10 and at least 1 all-capital words; wrapped in double quotes
    "1040": '"Matthias Algiers is a SKILLED engineer with STRONG leadership and ten years of experience."',
}


def ifeval_texts(doc_id: str) -> list[str]:
    good = IFEVAL_GOOD[doc_id]
    return [
        good,
        f"Sure, here it is:\n{good}\nHope this helps!",  # the loose scores also try without first/last line
        "",
        "\ufffd\ufffd I cannot help with that, Sorry.",
    ]


def no_network(*args, **kwargs):
    raise AssertionError(f"nltk.download{args} called: the test must not need the network")


@pytest.fixture(scope="module")
def ifeval_scored(tmp_path_factory) -> tuple[TaskSpec, list[Scored]]:
    # As in test_task_ifeval: NLTK's data in a temporary cache, and no network. Only while scoring:
    # the SmolLM2 test below needs the real QUANTEVAL_CACHE, where the converted model is kept.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTEVAL_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(nltk, "download", no_network)
        ensure_punkt()
        return score_both("ifeval", {doc_id: ifeval_texts(doc_id) for doc_id in IFEVAL_GOOD})


def test_ifeval_evaluator_scores_equal_quanteval(ifeval_scored):
    spec, scored = ifeval_scored
    assert len(scored) == len(IFEVAL_GOOD) * 4
    check_requests(spec, scored)
    mismatches = []
    for s in scored:
        (sample,) = s.samples.values()
        assert sample["filter"] == "none" and set(s.ours["scores"]) == set(IFEVAL_METRICS)
        for m in IFEVAL_METRICS:
            if s.ours["scores"][m] != sample[m]:
                mismatches.append((s.doc["id"], s.text[:60], m, "quanteval", s.ours["scores"][m], "lm-eval", sample[m]))
    assert not mismatches
    strict = [s.ours["scores"]["prompt_level_strict_acc"] for s in scored]
    loose = [s.ours["scores"]["prompt_level_loose_acc"] for s in scored]
    assert set(strict) == {True, False} and any(lo and not st for st, lo in zip(strict, loose))
    assert all(s.ours["scores"]["prompt_level_strict_acc"] for s in scored if s.text == IFEVAL_GOOD[s.doc["id"]])


def test_ifeval_scores_equal_stock_process_results(ifeval_scored, monkeypatch):
    monkeypatch.setattr(nltk, "download", no_network)
    from lm_eval.tasks.ifeval import utils  # imported after ensure_punkt (in ifeval_scored)

    _, scored = ifeval_scored
    mismatches = []
    for s in scored:
        stock = utils.process_results(s.doc, [s.text])
        if s.ours["scores"] != stock:
            mismatches.append((s.doc["id"], s.text[:60], "quanteval", s.ours["scores"], "stock", stock))
    assert not mismatches


# ---------------------------------------------------------------- generation vs HFLM




def generate_both(loaded, spec: TaskSpec, stops: list[str], max_new_tokens: int, batch_size: int,
                  **hflm_kwargs) -> tuple[list, list[str]]:
    """quanteval's generations and HFLM's texts (batch 1, greedy) for ``spec.docs``' chat prompts."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = loaded.tokenizer
    prompts = [prompt_for(spec, tok, d, "chat", "model") for d in spec.docs]
    assert {add for _, add in prompts} == {False}  # the chat template carries the special tokens
    gens = generate(loaded.model, tok, [p for p, _ in prompts], max_new_tokens, stop=stops,
                    batch_size=batch_size, add_special_tokens=False)
    # HFLM gets its own tokenizer: it sets a pad token on tokenizers that lack one
    lm = HFLM(pretrained=loaded.model, tokenizer=AutoTokenizer.from_pretrained(tok.name_or_path), batch_size=1,
              **hflm_kwargs)
    requests = [Instance(request_type="generate_until", doc=d, idx=0,
                         arguments=(p, {"until": list(stops), "max_gen_toks": max_new_tokens, "do_sample": False}))
                for d, (p, _) in zip(spec.docs, prompts)]
    return gens, lm.generate_until(requests, disable_tqdm=True)


def load_tiny(tiny_model: Path):
    return load_model(ModelConfig(name="tiny", source="hf", package=None, gguf_file=None, name_or_path=str(tiny_model)),
                      torch.device("cpu"), torch.float32)


def test_generation_equals_hflm_on_tiny_model_special_tokens_only(tiny_model, one_thread):
    # The fixture's tokenizer knows only lowercase letters, space and '.', so GSM8K prompts are full of
    # <unk>, and the random tied-embedding model echoes <unk> at every step: both engines drop it when
    # decoding (skip_special_tokens=True), so both texts are empty.
    loaded = load_tiny(tiny_model)
    spec = load_spec("gsm8k", resolve_data_dir(None), 4, 16, {})
    # max_length: HFLM's context window defaults to max_position_embeddings (256 here) and it would
    # left-truncate the longer prompts to 256 - max_gen_toks tokens; quanteval never truncates a prompt
    gens, texts = generate_both(loaded, spec, stop_strings(spec, "chat"), 16, batch_size=4, max_length=1024)
    assert [g.text for g in gens] == texts == [""] * 4
    assert [(g.finish, g.n_tokens) for g in gens] == [("length", 16)] * 4


def talking_tiny(tiny_model: Path):
    """The tiny model made to talk: a random untied output layer, with EOS and <unk> in place of two words.

    Two output rows are copies (x1.01) of word rows, so EOS ("</s>") and <unk> are emitted where
    "nine" and " at" would be: some sequences end on EOS, and a special token (which both engines skip
    when decoding) appears mid-text. ("Ġ" marks a leading space in byte-level BPE.)
    """
    loaded = load_tiny(tiny_model)
    model, tok = loaded.model, loaded.tokenizer
    nine, at = tok.convert_tokens_to_ids(["nine", "Ġat"])
    assert tok.unk_token_id not in (nine, at)
    model.config.tie_word_embeddings = False  # HFLM calls tie_weights()
    w = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))  # (vocab, hidden)
    w[tok.eos_token_id] = 1.01 * w[nine]
    w[tok.unk_token_id] = 1.01 * w[at]
    model.lm_head.weight = torch.nn.Parameter(w)
    return loaded


def test_generation_equals_hflm_on_tiny_model(tiny_model, one_thread):
    loaded = talking_tiny(tiny_model)
    model, tok = loaded.model, loaded.tokenizer
    spec = load_spec("gsm8k", resolve_data_dir(None), 4, 24, {})
    # the model cannot spell the task's stop strings (its alphabet is lowercase letters, space and '.'),
    # so a two-token phrase of its own is added as a stop
    stops = stop_strings(spec, "chat") + ["eight wa"]
    gens, texts = generate_both(loaded, spec, stops, 24, batch_size=4, max_length=1024)
    assert [g.text for g in gens] == texts
    assert {g.finish for g in gens} == {"eos", "stop", "length"} and all(texts)

    ids = tok(prompt_for(spec, tok, spec.docs[1], "chat", "tiny")[0], add_special_tokens=False, return_tensors="pt")
    greedy = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tok.unk_token_id in greedy.tolist()  # the special-token case was exercised


def test_generation_equals_hflm_when_a_stop_string_is_a_special_token(tiny_model, one_thread):
    # The model ends its turns with "</s>", a special token and one of gsm8k's stop strings, but its
    # generation config names another EOS (as a base model's <|endoftext|> beside a chat <|im_end|>).
    # HFLM stops there: its stop criterion decodes with special tokens (and it adds the tokenizer's EOS
    # string to every request's stops). quanteval matches stop strings on text decoded with
    # skip_special_tokens=True, where "</s>" never appears, and runs on to the cap.
    loaded = talking_tiny(tiny_model)
    loaded.model.generation_config.eos_token_id = loaded.tokenizer.bos_token_id
    spec = load_spec("gsm8k", resolve_data_dir(None), 4, 24, {})
    stops = stop_strings(spec, "chat")
    assert loaded.tokenizer.eos_token in stops
    gens, texts = generate_both(loaded, spec, stops, 24, batch_size=4, max_length=1024)
    assert [g.text for g in gens] == texts


@pytest.mark.slow
def test_generation_equals_hflm_on_smollm2(one_thread):
    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    spec = load_spec("gsm8k", resolve_data_dir(None), 3, 48, {})
    gens, texts = generate_both(loaded, spec, stop_strings(spec, "chat"), 48, batch_size=3)
    assert [g.text for g in gens] == texts
    assert all(texts)
