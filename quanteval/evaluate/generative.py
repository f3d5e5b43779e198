"""The generative tasks (chat, summarization, math, code): generate, score, compare with the baseline.

A task is defined once, as an lm-eval YAML file in ``tasks/`` (the installed package
``quanteval_tasks``): data loader, prompt, stop strings, token cap, filters and metrics. quanteval
loads it through lm-eval's own ``TaskManager`` and scores each answer with lm-eval's own filters and
``process_results``, so a score here is the score lm-eval would give the same text. What quanteval
adds is its generation engine (``quanteval.generate``) and the comparison with the unquantised model.

The YAML's ``metadata.quanteval`` block (ignored by lm-eval) says:

- ``chat``: apply the model's chat template to ``doc_to_text`` (a model without one fails with a
  one-line error unless ``model.prompt_format=plain``, which uses ``PLAIN_PROMPT``);
- ``primary``: the headline metric (``metric`` or ``metric,filter``);
- ``binary``: the primary metric is 0/1 per item, so flips and McNemar's test apply;
- ``teacher_forced``: ``reference`` (the YAML's ``doc_to_target``) or ``baseline`` (the baseline's
  own answer): the text on which the variant's token KL and top-1 agreement are measured;
- ``tags``: doc fields copied into each per-item record (e.g. ``k``, ``n_steps``) for breakdowns;
- ``sweep``: how quanteval sizes, sweeps and reports the task (``quanteval_tasks`` documents it).

Per variant, a run reports the task's metrics, and against the baseline:

- flips (binary tasks): correct -> wrong (``flips_lost``), wrong -> correct (``flips_gained``), and
  the exact two-sided McNemar p-value on those discordant pairs;
- ``same_output``: the share of items whose answer is identical to the baseline's, and
  ``rougeL_vs_base``: ROUGE-L F1 between the two answers;
- teacher-forced fidelity: token KL(base || variant) and same-top-token rate on the texts above
  (``tf_kl_mean`` is per token, pooled over items; ``kl_pos`` per item keeps every position).

The baseline's generations, scores and top-k log-probs are computed once per (model, task
settings) and cached on disk; the baseline run itself reuses them.

**One batch for a variant's tasks.** At the default preset each task has 8 prompts: alone, a task
is one short batch whose decode steps run at a quarter of the batch the CPU handles best (32 rows
give twice the tokens per second of 8 on SmolLM2). So the first generative job of a variant
generates the answers of its siblings too (``TaskContext.siblings``: the same variant's generative
runs still to compute in this process, which the sweep fills in when Hydra's basic launcher runs
the jobs in-process) in one continuous batch, each prompt with its own task's cap and stop
strings (``generate_together``); the later jobs take their answers from the session. Run files,
locks and resume stay per task: a sibling finished meanwhile by another process is simply not
used, and an interruption loses at most the batch in flight. Tasks join while the batch has at
most ``TOGETHER_MAX_ITEMS`` prompts (a task of the full preset fills the batch on its own, and is
generated alone, so an interruption costs one task). Under a launcher with one process per run
(SLURM, submitit local) there are no siblings and each job generates its own task.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from quanteval import results
from quanteval.evaluate import TaskResult
from quanteval.results import primary_value, read_items  # noqa: F401 - read_items: part of this module's API
from quanteval_tasks import TaskInfo

log = logging.getLogger(__name__)

PLAIN_PROMPT = "Question: {text}\nAnswer:"  # model.prompt_format=plain, for models without a chat template
PLAIN_STOP = ["\nQuestion:"]
TOP_K = 64  # baseline log-probs kept per teacher-forced position (as on WikiText-2)
TOGETHER_MAX_ITEMS = 128  # prompts of several tasks generated in one batch at most (generate_together)

# Optional judges for open-ended answers: name -> fn(doc, answer, baseline_answer) -> score in [0, 1].
# None ship (no judge model is reachable here); register one and set ``judge=<name>``.
JUDGES: dict[str, Callable[[dict, str, str], float]] = {}


@dataclass
class TaskSpec:
    """A loaded task: its lm-eval task object, docs (already limited), and quanteval settings."""

    name: str
    lm_task: Any
    module: Any
    docs: list[dict]
    until: list[str]
    max_new_tokens: int
    info: TaskInfo

    @property
    def primary(self) -> str:
        return self.info.primary


def lmeval_name(name: str) -> str:
    return f"quanteval_{name}"


@lru_cache(maxsize=16)
def _load_lm_task(name: str, data_root: str, options: tuple):
    from lm_eval.tasks import TaskManager

    from quanteval_tasks import task_dirs

    tm = TaskManager(include_path=[str(d) for d in task_dirs()], include_defaults=False,
                     metadata={"data_dir": data_root, **dict(options)})
    task_log = logging.getLogger("lm_eval.api.task")
    level = task_log.level
    task_log.setLevel(logging.ERROR)  # its "custom kwargs can be passed to --metadata" hint is for lm-eval's CLI
    try:
        loaded = tm.load([lmeval_name(name)])["tasks"]
    finally:
        task_log.setLevel(level)
    return next(iter(loaded.values()))


def load_spec(name: str, data_root: Path, limit: int, max_new_tokens: int | None, options: dict) -> TaskSpec:
    """The task ``name`` from ``tasks/<name>.yaml`` with at most ``limit`` docs (0 or less is an error).

    A task whose YAML sets ``sweep.limit_per: {tag, option}`` (arith_chain: items per number of steps k)
    counts ``limit`` per value of the tag: its loader is given ``option=limit`` and every doc is kept.
    """
    from quanteval_tasks import load_module, task_table

    if limit is None or limit < 1:
        raise ValueError(f"task {name}: limit={limit}: must be a positive number of items")
    info = task_table()[name]
    opts = dict(options)
    if info.limit_per:
        opts[info.limit_per[1]] = limit
    hashable = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items()))
    task = _load_lm_task(name, str(data_root), hashable)
    module = load_module(info)
    docs = [dict(d) for d in task.test_docs()]
    if not docs:
        raise ValueError(f"task {name}: empty dataset")
    if not info.limit_per:
        docs = docs[:limit]
    gen = dict(task.config.generation_kwargs or {})
    until = gen.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    cap = int(max_new_tokens) if max_new_tokens else int(gen.get("max_gen_toks", 256))  # the preset's cap wins
    return TaskSpec(name, task, module, docs, until, cap, info)


def check_metrics(spec: TaskSpec) -> None:
    """Every metric the YAML declares must be one lm-eval knows or one the task's scorer returns."""
    from lm_eval.api.registry import get_metric

    for m in spec.lm_task.config.metric_list or []:
        metric = m["metric"]
        if spec.lm_task.config.process_results is None and not callable(metric):
            try:
                found = get_metric(metric)  # logs and returns None when unknown
            except Exception:  # noqa: BLE001 - some versions raise instead
                found = None
            if found is None:
                raise ValueError(f"tasks/{spec.name}.yaml: unknown metric {metric!r}")


def prompt_for(spec: TaskSpec, tokenizer, doc: dict, prompt_format: str, model_name: str) -> tuple[str, bool]:
    """The prompt string for ``doc`` and whether to add the tokenizer's special tokens when encoding."""
    text = spec.lm_task.doc_to_text(doc)
    if not spec.info.chat:
        return text, True
    if prompt_format == "plain":
        return PLAIN_PROMPT.format(text=text), True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {model_name} has no chat template and task {spec.name} is a chat task: "
                         "set model.prompt_format=plain to use the plain 'Question: ... Answer:' format")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True), False


def stop_strings(spec: TaskSpec, prompt_format: str) -> list[str]:
    return spec.until + (PLAIN_STOP if spec.info.chat and prompt_format == "plain" else [])


def score_items(spec: TaskSpec, texts: list[str], sandbox: str = "bwrap") -> list[dict]:
    """Per item: ``scores`` (metric -> value) and ``extracted`` (filter -> filtered answer).

    Scored by lm-eval's own filters and ``process_results`` (as its evaluator does), except for
    tasks whose module defines ``score_item`` (code execution, which needs quanteval's sandbox).
    """
    from lm_eval.api.instance import Instance

    if hasattr(spec.module, "score_item"):
        out = []
        for doc, text in zip(spec.docs, texts):
            scores, extra = spec.module.score_item(doc, text, sandbox=sandbox)
            out.append({"scores": scores, "extracted": {}, "extra": extra})
        return out
    insts = []
    for i, (doc, text) in enumerate(zip(spec.docs, texts)):
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0,
                        metadata=(spec.lm_task.config.task, i, 1))
        inst.resps = [text]
        insts.append(inst)
    for f in getattr(spec.lm_task, "_filters", []):
        f.apply(insts)
    out = []
    for doc, inst in zip(spec.docs, insts):
        scores, extracted = {}, {}
        for key, resp in inst.filtered_resps.items():
            for metric, value in spec.lm_task.process_results(doc, [resp]).items():
                scores[metric if key == "none" else f"{metric},{key}"] = value
            extracted[key] = resp if isinstance(resp, (str, int, float)) or resp is None else str(resp)
        out.append({"scores": scores, "extracted": extracted, "extra": {}})
    return out


def aggregate(spec: TaskSpec, items: list[dict]) -> dict:
    """Run-level metrics from per-item scores, with lm-eval's aggregation functions."""
    aggs = spec.lm_task.aggregation()
    declared = [m["metric"] for m in spec.lm_task.config.metric_list or [] if isinstance(m["metric"], str)]
    returned = {k.split(",")[0] for k in items[0]["scores"]}
    missing = [m for m in declared if m not in returned]
    if missing:
        raise ValueError(f"tasks/{spec.name}.yaml: metric {missing[0]!r} is declared but the task's scorer "
                         f"does not return it (it returns: {', '.join(sorted(returned))})")
    out = {}
    for metric in items[0]["scores"]:
        base = metric.split(",")[0]
        fn = aggs.get(base)
        values = [it["scores"][metric] for it in items]
        out[metric] = float(fn(values)) if fn else float(sum(map(float, values)) / len(values))
    return out


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def correct(item: dict, primary: str) -> bool:
    return (primary_value(item, primary) or 0.0) >= 0.5


@lru_cache(maxsize=1)
def _rouge_l():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(a: str, b: str) -> float:
    if not a.strip() and not b.strip():
        return 1.0
    return float(_rouge_l().score(b, a)["rougeL"].fmeasure)


def compare_with_baseline(spec: TaskSpec, items: list[dict], base_items: list[dict]) -> dict:
    """Agreement of a variant's per-item results with the baseline's; annotates ``items`` in place."""
    out: dict[str, float] = {}
    same = []
    for it, b in zip(items, base_items):
        it["same_output"] = it["output"] == b["output"]
        it["rougeL_vs_base"] = rouge_l(it["output"], b["output"])
        same.append(it["same_output"])
    out["same_output"] = sum(same) / len(same)
    out["rougeL_vs_base"] = sum(it["rougeL_vs_base"] for it in items) / len(items)
    if spec.info.binary:
        lost = gained = 0
        for it, b in zip(items, base_items):
            was, now = correct(b, spec.primary), correct(it, spec.primary)
            it["flip"] = "lost" if was and not now else "gained" if now and not was else None
            lost += it["flip"] == "lost"
            gained += it["flip"] == "gained"
        out.update(flips_lost=lost, flips_gained=gained, flip_rate=(lost + gained) / len(items),
                   mcnemar_p=mcnemar_exact(lost, gained))
    return out


def teacher_forced_summary(items: list[dict]) -> dict:
    """Token-pooled teacher-forced KL / NLL / top-1 over the items that have a text."""
    tf = [it["tf"] for it in items if it.get("tf")]
    n = sum(t["n_tokens"] for t in tf)
    if not n:
        return {}
    return {"tf_kl_mean": sum(t["kl_mean"] * t["n_tokens"] for t in tf) / n,
            "tf_top1": sum(t["top1"] * t["n_tokens"] for t in tf) / n,
            "tf_nll_mean": sum(t["nll_mean"] * t["n_tokens"] for t in tf) / n,
            "tf_tokens": n}


def breakdown(spec: TaskSpec, items: list[dict]) -> dict:
    """Primary metric and teacher-forced KL by each tag value (e.g. accuracy per number of steps)."""
    out = {}
    for tag in spec.info.tags:
        groups: dict[str, list[dict]] = {}
        for it in items:
            groups.setdefault(str(it["tags"].get(tag)), []).append(it)
        out[tag] = {}
        for value, group in sorted(groups.items(), key=lambda kv: _num(kv[0])):
            row = {"n": len(group),
                   spec.primary: sum(primary_value(it, spec.primary) for it in group) / len(group)}
            row.update({k: v for k, v in teacher_forced_summary(group).items() if k == "tf_kl_mean"})
            out[tag][value] = row
    return out


def _num(s: str):
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)


def write_items(path: Path, items: list[dict]) -> None:
    results.write_atomic(path, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))


class GenerativeTask:
    """``baseline(ctx)`` / ``score(ctx)`` for one generative task (the sweep's task interface)."""

    generative = True

    def __init__(self, name: str):
        from quanteval_tasks import task_table

        self.name = name
        self.info = task_table()[name]

    def preset_sizes(self, preset) -> tuple[int | None, int | None]:
        """(items, token cap) the preset gives this task: ``preset.limits.<name>`` /
        ``preset.max_new_tokens.<name>`` when set (overrides), else the task YAML's sizes for the preset."""
        limit, cap = self.info.sizes(preset.name)
        return preset.limits.get(self.name, limit), preset.max_new_tokens.get(self.name, cap)

    def task_meta(self) -> dict:
        return self.info.to_json()

    def preset_settings(self, cfg) -> dict:
        limit, cap = self.preset_sizes(cfg.preset)
        return {"limit": limit, "max_new_tokens": cap, "sandbox": cfg.sandbox, "judge": cfg.judge}

    def limit(self, cfg) -> int:
        """Items scored: ``task.limit``, else the preset's (ValueError in one line when neither is set)."""
        limit = cfg.task.limit or self.preset_sizes(cfg.preset)[0]
        if limit is None:
            raise ValueError(f"task {self.name}: no limit for preset {cfg.preset.name}; set task.limit, "
                             f"preset.limits.{self.name}, or sweep.presets.{cfg.preset.name} in {self.info.yaml.name}")
        return limit

    def options(self, cfg, tokenizer=None) -> dict:
        """The loader's options: ``task.options``, and for a task sized in the model's tokens
        (``sweep.model_options``) the model's tokenizer, window and the preset's name."""
        opts = dict(cfg.task.options)
        if self.info.model_options:
            from quanteval.models import model_config, tokenizer_source

            src = getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None
            opts["tokenizer"] = src if src and Path(src).exists() else tokenizer_source(cfg.model)
            opts["window"] = getattr(model_config(cfg.model), "max_position_embeddings", None)
            opts["preset"] = cfg.preset.name
        return opts

    def spec(self, ctx) -> TaskSpec:
        cfg = ctx.cfg
        cap = cfg.task.max_new_tokens or self.preset_sizes(cfg.preset)[1]
        tok = ctx.loaded.tokenizer if ctx.loaded is not None else None
        spec = load_spec(self.name, ctx.data_root, self.limit(cfg), cap, self.options(cfg, tok))
        check_metrics(spec)
        return spec

    def _settings(self, ctx, spec: TaskSpec) -> dict:
        import quanteval
        from quanteval_tasks import hashed_yaml_text

        yaml_text = hashed_yaml_text(self.info.yaml)  # without its sweep block: see hashed_yaml_text
        module_text = self.info.module.read_text(encoding="utf-8")
        return {"model": ctx.model_key, "task": self.name, "yaml": results.run_key({"y": yaml_text, "m": module_text}),
                "ids": [d["id"] for d in spec.docs], "max_new_tokens": spec.max_new_tokens,
                "prompt_format": ctx.cfg.model.prompt_format, "sandbox": ctx.cfg.sandbox,
                "top_k": TOP_K, "quanteval": quanteval.__version__}

    def _paths(self, ctx, spec: TaskSpec) -> tuple[Path, Path]:
        key = results.run_key(self._settings(ctx, spec))
        stem = ctx.cache_dir / "baseline" / f"{self.name}-{key}"
        return stem.with_name(stem.name + ".items.jsonl"), stem.with_name(stem.name + ".tf.pt")

    def cache_paths(self, ctx) -> list[Path]:
        """The baseline cache files this task reads (for ``plan=true``)."""
        return list(self._paths(ctx, self.spec(ctx)))

    def _prompts(self, ctx, spec: TaskSpec) -> list[tuple[str, bool]]:
        tok = ctx.loaded.tokenizer
        return [prompt_for(spec, tok, d, ctx.cfg.model.prompt_format, ctx.cfg.model.name) for d in spec.docs]

    def _requests(self, ctx, spec: TaskSpec, prompts) -> list:
        from quanteval.generate import Request

        tok, stop = ctx.loaded.tokenizer, tuple(stop_strings(spec, ctx.cfg.model.prompt_format))
        return [Request(tok(p, add_special_tokens=sp)["input_ids"], spec.max_new_tokens, stop) for p, sp in prompts]

    def _generate(self, ctx, spec: TaskSpec, prompts, key: str, siblings: list) -> tuple[list, dict, list | None]:
        """This task's answers, how they were generated, and its teacher-forced records when the batch
        computed them ahead (for drafts; else None): kept in the session by an earlier job's batch under
        ``key``, else generated now together with ``siblings`` (see ``generate_together``)."""
        kept = ctx.session.take_generations(key) if ctx.session is not None else None
        if kept is not None and len(kept[0]) == len(prompts):
            return kept
        return generate_together(ctx, (self, spec, prompts, key), siblings, baseline=key.startswith("baseline:"))

    def drafts_from_baseline(self, ctx, spec: TaskSpec) -> bool:
        """Whether a variant's teacher-forced pass on this task reads the baseline's answers (cached
        already), so its agreement with them can serve as drafts (``preset.gen_draft``; not for the
        baseline itself)."""
        return (self.info.teacher_forced == "baseline" and ctx.cfg.preset.gen_draft
                and not ctx.run.variant.is_baseline and self._paths(ctx, spec)[1].exists())

    def teacher_forced(self, ctx, spec: TaskSpec) -> list[dict | None]:
        """Per item, the model's teacher-forced record against the baseline's (None: no text to score);
        the baseline's own, from the statistics its one pass recorded (no second pass)."""
        import torch

        from quanteval.evaluate import fidelity

        tf = torch.load(self._paths(ctx, spec)[1], weights_only=False)
        present = [s for s in tf["seqs"] if s is not None]
        if ctx.run.variant.is_baseline:
            compared = iter(fidelity.sequence_compare_baseline(present, tf["stats"]))
        else:
            compared = iter(fidelity.sequence_compare(ctx.loaded.model, present, tf["stats"]))
        return [next(compared) if s is not None else None for s in tf["seqs"]]

    def drafts(self, ctx, spec: TaskSpec, requests: list, records: list[dict | None]) -> list:
        """``requests`` with drafts: the leading tokens of the baseline's answer that the teacher-forced
        ``records`` found to be this model's own greedy choices."""
        import dataclasses

        import torch

        seqs = torch.load(self._paths(ctx, spec)[1], weights_only=False)["seqs"]
        out = []
        for req, seq, rec in zip(requests, seqs, records):
            if seq is not None and rec and rec.get("own_prefix") and seq[0][:seq[1]] == list(req.ids):
                ids, start = seq
                req = dataclasses.replace(req, draft=tuple(ids[start:start + rec["own_prefix"]]))
            out.append(req)
        return out

    def _items(self, ctx, spec: TaskSpec, prompts, gens) -> list[dict]:
        scored = score_items(spec, [g.text for g in gens], ctx.cfg.sandbox)
        items = []
        for doc, (prompt, _), g, s in zip(spec.docs, prompts, gens, scored):
            items.append({"id": doc["id"], "input": spec.lm_task.doc_to_text(doc), "output": g.text,
                          "finish": g.finish, "n_tokens": g.n_tokens, **s,
                          "tags": {t: doc.get(t) for t in spec.info.tags}})
        return items

    def _sequences(self, ctx, spec: TaskSpec, prompts, texts: list[str]) -> list[tuple[list[int], int] | None]:
        """Teacher-forced sequences: prompt tokens + text tokens (capped at the token cap)."""
        tok = ctx.loaded.tokenizer
        seqs = []
        for (prompt, specials), text in zip(prompts, texts):
            target = tok(text, add_special_tokens=False)["input_ids"][: spec.max_new_tokens]
            if not text or not target:
                seqs.append(None)
                continue
            ids = tok(prompt, add_special_tokens=specials)["input_ids"]
            seqs.append((ids + target, len(ids)))
        return seqs

    def _tf_texts(self, spec: TaskSpec, items: list[dict]) -> list[str]:
        if spec.info.teacher_forced == "reference":
            return [str(spec.lm_task.doc_to_target(d)) for d in spec.docs]
        return [it["output"] for it in items]

    def baseline(self, ctx) -> None:
        """Generate, score and record the baseline's top-k log-probs on the teacher-forced texts, once."""
        from quanteval.evaluate import fidelity

        spec = self.spec(ctx)
        items_path, tf_path = self._paths(ctx, spec)

        def compute():
            log.info("computing the baseline's %s answers once (%d items): %s", self.name, len(spec.docs),
                     items_path.name)
            prompts = self._prompts(ctx, spec)
            gens, _, _ = self._generate(ctx, spec, prompts, _baseline_key(items_path), ctx.siblings)
            items = self._items(ctx, spec, prompts, gens)
            seqs = self._sequences(ctx, spec, prompts, self._tf_texts(spec, items))
            present = [s for s in seqs if s is not None]
            return items, {"seqs": seqs, "stats": fidelity.sequence_baseline(ctx.loaded.model, present, TOP_K)}

        def save(path, value):
            items, tf = value
            results.torch_save_atomic(tf_path, tf)
            write_items(path, items)  # written last: its presence marks a complete cache

        ctx.cached(items_path, compute, save, requires=(tf_path,))

    def score(self, ctx) -> TaskResult:
        spec = self.spec(ctx)
        if ctx.cfg.judge and ctx.cfg.judge not in JUDGES:
            raise ValueError(f"judge={ctx.cfg.judge}: no such judge registered "
                             f"(quanteval.evaluate.generative.JUDGES has: {', '.join(JUDGES) or 'none'})")
        items_path, _ = self._paths(ctx, spec)
        base_items = read_items(items_path)
        generation = records = None
        if not ctx.run.variant.is_baseline:  # quantised weights, or the KV cache alone
            prompts = self._prompts(ctx, spec)
            gens, generation, records = self._generate(ctx, spec, prompts, ctx.run.key, ctx.siblings)
            items = self._items(ctx, spec, prompts, gens)
        else:  # the baseline run: the cached answers are this model's answers
            items = [dict(it) for it in base_items]
        for it, rec in zip(items, records if records is not None else self.teacher_forced(ctx, spec)):
            it["tf"] = rec
        metrics = aggregate(spec, items)
        metrics.update(compare_with_baseline(spec, items, base_items))
        metrics.update(teacher_forced_summary(items))
        if ctx.cfg.judge:
            judge = JUDGES[ctx.cfg.judge]
            for doc, it, b in zip(spec.docs, items, base_items):
                it["judge"] = float(judge(doc, it["output"], b["output"]))
            metrics["judge"] = sum(it["judge"] for it in items) / len(items)
        metrics["n_items"] = len(items)
        metrics["hit_cap_rate"] = sum(it["finish"] == "length" for it in items) / len(items)
        if spec.primary not in metrics:
            raise ValueError(f"tasks/{self.name}.yaml: primary metric {spec.primary!r} is not among the "
                             f"task's metrics ({', '.join(sorted(metrics))})")
        metrics["primary"] = metrics[spec.primary]
        return TaskResult(metrics=metrics, items=items, breakdown=breakdown(spec, items), primary_metric=spec.primary,
                          sandbox=ctx.cfg.sandbox if hasattr(spec.module, "score_item") else None,
                          generation=generation)


def _baseline_key(items_path: Path) -> str:
    return f"baseline:{items_path}"


def generate_together(ctx, first: tuple, siblings: list, baseline: bool = False) -> tuple[list, dict]:
    """Generate ``first``'s answers (task, spec, prompts, session key) in one batch with those of
    ``siblings`` (TaskContexts of the same model state), while the batch holds at most
    ``TOGETHER_MAX_ITEMS`` prompts; the siblings' answers are kept in the session for their jobs
    (under their run keys, or, when ``baseline``, under their baseline cache files', for the siblings
    whose baseline cache is not written yet).

    Returns ``first``'s generations and a record of the batch: its tasks, prompts, seconds and tokens,
    with this task's tokens and its share of the seconds (by tokens: ``share_s``), which the sweep
    books as this task's generation time, so ``plan=true`` estimates each task by its own share."""
    import time

    from quanteval.generate import generate_requests

    task, spec, prompts, key = first
    members = [(task, ctx, spec, prompts, key)]
    total = len(prompts)
    for sib in siblings:
        if total >= TOGETHER_MAX_ITEMS:
            break
        try:
            stask = GenerativeTask(sib.cfg.task.name)
            sspec = stask.spec(sib)
            sprompts = stask._prompts(sib, sspec)
            items_path = stask._paths(sib, sspec)[0] if baseline else None
        except Exception:  # noqa: BLE001 - a sibling that cannot load is left to its own job (and its error)
            log.debug("sibling %s not batched", sib.cfg.task.name, exc_info=True)
            continue
        if total + len(sprompts) > TOGETHER_MAX_ITEMS:
            continue
        if items_path is not None and items_path.exists():  # its baseline answers are cached already
            continue
        skey = _baseline_key(items_path) if baseline else sib.run.key
        members.append((stask, sib, sspec, sprompts, skey))
        total += len(sprompts)
    requests, spans, records = [], [], []
    for t, c, sp, ps, _ in members:
        reqs = t._requests(c, sp, ps)
        # a task scored on the baseline's answers: its teacher-forced pass first, its agreement as drafts
        recs = t.teacher_forced(c, sp) if not baseline and t.drafts_from_baseline(c, sp) else None
        if recs is not None:
            reqs = t.drafts(c, sp, reqs, recs)
        spans.append((len(requests), len(requests) + len(reqs)))
        requests += reqs
        records.append(recs)
    names = [m[0].name for m in members]
    if len(members) > 1:
        log.info("generating %d prompts of %d tasks in one batch: %s", len(requests), len(members), ", ".join(names))
    t0 = time.perf_counter()
    gens = generate_requests(ctx.loaded.model, ctx.loaded.tokenizer, requests,
                             batch_size=ctx.cfg.preset.batch_size(), desc=f"{'+'.join(names)} generate",
                             kv_budget=ctx.cfg.preset.gen_kv_budget_mb << 20)
    seconds = time.perf_counter() - t0
    batch_tokens = max(1, sum(g.n_tokens for g in gens))

    def info(a: int, b: int) -> dict:  # what each member's run file records of the batch, and its share
        tokens = sum(g.n_tokens for g in gens[a:b])
        return {"batched_with": names, "prompts": len(requests), "generated_by": task.name,
                "batch_s": round(seconds, 2), "batch_tokens": batch_tokens, "tokens": tokens,
                "share_s": round(seconds * tokens / batch_tokens, 2),
                # tokens taken from drafts (the baseline's answer where this model agreed), and numerical ties
                "draft_offered": sum(len(r.draft) for r in requests[a:b]),
                "drafted": sum(g.drafted for g in gens[a:b]), "draft_ties": sum(g.draft_ties for g in gens[a:b])}

    for (t, c, sp, ps, k), (a, b), recs in zip(members[1:], spans[1:], records[1:]):
        c.session.put_generations(k, gens[a:b], info(a, b), recs)
    return gens[spans[0][0]:spans[0][1]], info(*spans[0]), records[0]
