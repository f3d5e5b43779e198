"""The command lines: ``quanteval [overrides]``, ``quanteval-report`` and ``quanteval-export``. The only
module that imports Hydra and OmegaConf, and the home of every console entry point.

``conf/config.yaml`` puts Hydra in MULTIRUN mode with the default grid in
``hydra.sweeper.params``; overrides change it (``quanteval bits=4,3
method=rtn``). Before Hydra launches anything, ``main`` expands the whole
grid, composes every job's config and validates it, so a bad value in job 7
fails in one line before job 1 does any work. A Hydra ``Callback`` writes
the report when the sweep ends.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import lru_cache
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from quanteval import config as C
from quanteval.results import WriteError
from quanteval.session import Session
from quanteval.thresholds import Thresholds

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task", "preset")
log = logging.getLogger("quanteval")

_FAILED: list[str] = []  # 'task variant (error)' of each run that failed in this process
_SESSION = Session()  # what this process keeps between the jobs Hydra hands it (model, captures, caches)


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=C.RunConfig)
    cs.store(group="model", name="base_model", node=C.ModelConfig)
    cs.store(group="method", name="base_none", node=C.NoneConfig)
    cs.store(group="method", name="base_rtn", node=C.RTNConfig)
    cs.store(group="method", name="base_gptq", node=C.GPTQConfig)
    cs.store(group="method", name="base_awq", node=C.AWQConfig)
    cs.store(group="method", name="base_llmcompressor", node=C.LLMCompressorConfig)
    cs.store(group="method", name="base_bnb", node=C.BnbConfig)
    cs.store(group="method", name="base_gguf", node=C.GGUFConfig)
    cs.store(group="method", name="base_hqq", node=C.HQQConfig)
    cs.store(group="method", name="base_autoround", node=C.AutoRoundConfig)
    cs.store(group="method", name="base_artifact", node=C.ArtifactConfig)
    cs.store(group="method", name="base_mixed", node=C.MixedConfig)
    cs.store(group="task", name="base_wikitext2", node=C.WikiText2Config)
    cs.store(group="task", name="base_wikitext2_long", node=C.LongWikiText2Config)
    cs.store(group="task", name="base_sensitivity", node=C.SensitivityConfig)
    cs.store(group="task", name="base_generative", node=C.GenerativeTaskConfig)
    cs.store(group="task", name="base_lmeval", node=C.LMEvalTaskConfig)
    cs.store(group="preset", name="base_preset", node=C.PresetConfig)
    for name, info in _task_table().items():  # task=<name> for every tasks/<name>.yaml: no conf/task file needed
        cs.store(group="task", name=name, node=C.GenerativeTaskConfig(name=name, options=dict(info.options)))


def _task_table() -> dict:
    """The generative tasks (``quanteval_tasks.task_table``); a broken task YAML is one line, exit 2."""
    from quanteval_tasks import task_table

    try:
        return task_table()
    except ValueError as e:
        print(f"quanteval: error: {e}", file=sys.stderr)
        sys.exit(2)


_register()


class UsageError(Exception):
    """A bad command line or config: reported in one line, exit code 2."""


def _choices(group: str) -> list[str]:
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(files | set(_task_table())) if group == "task" else sorted(files)


def _check_group_values(overrides: list[str]) -> None:
    """Unknown model/method/task/preset names, with the known ones listed."""
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or not value or "(" in value:
            continue
        for v in value.split(","):
            if v.strip() not in _choices(key):
                raise UsageError(f"{key}={v.strip()}: unknown {key}; choose one of: {', '.join(_choices(key))}")


LAUNCHER_PLUGINS = {  # hydra/launcher=<name>: (plugin module, pip extra)
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "quanteval[cluster]"),
    "local": ("hydra_plugins.hydra_submitit_launcher", "quanteval[cluster]"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "quanteval[cluster]"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "quanteval[cluster]"),
    "ray_local": ("hydra_plugins.hydra_ray_launcher", "quanteval[ray]"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "quanteval[ray]"),
}


def _check_environment() -> None:
    """A bad QUANTEVAL_THREADS, SLURM_CPUS_PER_TASK or QUANTEVAL_MMAP_THRESHOLD: one line, before any job."""
    from quanteval.allocator import threshold_from
    from quanteval.threads import job_threads

    try:
        job_threads()
        threshold_from()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_launcher(overrides: list[str]) -> None:
    """A launcher whose Hydra plugin is not installed: one line naming the extra to install."""
    import importlib.util

    for ov in overrides:
        key, _, value = ov.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or value not in LAUNCHER_PLUGINS:
            continue
        module, extra = LAUNCHER_PLUGINS[value]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise UsageError(f"{ov}: Hydra's launcher plugin is not installed; pip install '{extra}'")


def to_run_config(cfg: DictConfig) -> C.RunConfig:
    """A composed job config as a validated ``RunConfig`` (UsageError in one line)."""
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    except Exception as e:  # noqa: BLE001 - OmegaConf's type errors: keep their first line
        raise UsageError(_first_line(e)) from None


def _first_line(e: BaseException) -> str:
    """The first line of an error, plus the first line of its cause (OmegaConf hides the detail there)."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        detail = str(cause).strip().splitlines()[0]
        if detail not in msg:
            msg = f"{msg}: {detail}"
    return msg


def expand_grid(overrides: list[str]) -> tuple[list[list[str]], list[C.RunConfig], int, str]:
    """The job overrides the sweep will launch (config's sweeper params, then the command line),
    each composed and validated; their run configs; how many distinct runs the preset's grid keeps;
    and the sweep's ``results_dir``."""
    from quanteval.variant import Run

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed_cli = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - override syntax errors, one line
        raise UsageError(_first_line(e)) from None
    plain = [o.input_line for o in parsed_cli if not o.is_sweep_override()]
    job_ov = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            master = compose("config", overrides=plain, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - Hydra composition errors, one line
            raise UsageError(_first_line(e)) from None
        params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + job_ov)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        results_dir = str(master.results_dir)
        user_bits = any(o.key_or_group == "bits" for o in parsed_cli)
        to_run, cfgs = set(), []
        no_type: dict[str, str] = {}  # typed method -> why a cell of it has no type (bnb at 3 bits)
        typed: set[str] = set()  # typed methods with at least one cell to run
        compose_job = _composer(compose)
        for job in jobs:
            try:
                job_cfg = compose_job(list(job))
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"{' '.join(job)}: {_first_line(e)}") from None
            run_cfg = to_run_config(job_cfg)
            _check_inputs(run_cfg)
            run_cfg.use_preset_grid = not user_bits
            cfgs.append(run_cfg)
            run = Run.of(run_cfg)
            if run_cfg.method.name == "gguf" and run.variant.format and run.preset_skip() is None:
                from quanteval.methods.gguf import missing_ggml

                why = missing_ggml(run.variant.format)  # a k-quant needs llama.cpp's own library, set up once
                if why:
                    raise UsageError(f"method=gguf: {why}")
            if run.variant.no_format is not None:
                no_type.setdefault(run_cfg.method.name, run.variant.no_format)
            elif run.variant.format is not None:
                typed.add(run_cfg.method.name)
            if run.preset_skip() is None:
                to_run.add(run.key)  # the baseline's key ignores bits: counted once
    GlobalHydra.instance().clear()
    for name, why in no_type.items():
        if name not in typed:  # nothing of this method would run: the request itself is wrong
            raise UsageError(why)
    return jobs, cfgs, len(to_run), results_dir


def _value_override(override: str, group_exists) -> bool:
    """Whether ``override`` only sets a value (``bits=4``, ``method.act_order=false``), as opposed to choosing
    a config group (``method=gptq``, ``task=ifeval``: ``group_exists``, Hydra's repository, says which keys
    are groups) or editing the defaults list (``+x``, ``~x``, ``x@pkg``, Hydra's own ``hydra/...``)."""
    key = override.split("=", 1)[0]
    if not key or key[0] in "+~" or "@" in key or key.startswith("hydra"):
        return False
    return not group_exists(key.replace(".", "/"))


def _composer(compose):
    """``compose("config", overrides=job)`` for each job of a sweep (inside ``initialize_config_dir``), with
    Hydra composing each distinct choice of config groups once: a job's value overrides are then applied
    to a copy of that composition by Hydra's own override code, as its compose applies them (after the
    defaults list, in order, in struct mode). The default grid's 112 jobs hold 28 distinct choices of
    groups (method x task): ``quanteval plan=true`` took 10.9 s against 20.0 s composing every job, and the
    sweep's start 19.5 s against 30.9 s. ``tests/test_cli.py`` checks it against composing every job."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    group_exists = GlobalHydra.instance().config_loader().repository.group_exists
    parser, composed = OverridesParser.create(), {}

    def compose_job(job: list[str]):
        values = [o for o in job if _value_override(o, group_exists)]
        groups = tuple(o for o in job if o not in values)
        if groups not in composed:
            composed[groups] = compose("config", overrides=list(groups))
        cfg = copy.deepcopy(composed[groups])
        ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides(values), cfg)
        return cfg

    return compose_job


def _check_folder(field: str, value: str, must_exist: bool = False) -> None:
    """A folder option: not a file, not under a file, and present when it must be (ValueError, one line)."""
    p = Path(value).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{field}={value}: is a file, not a folder")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if not p.exists() and parent is not None and not parent.is_dir():
        raise ValueError(f"{field}={value}: cannot be created: {parent} is a file, not a folder")
    if must_exist and not p.exists():
        raise ValueError(f"{field}={value}: no such folder")


def _check_inputs(cfg: C.RunConfig) -> None:
    """Cheap checks of the files and folders a job will read or write: results, data, task and model files."""
    from quanteval.data import data_file, resolve_data_dir

    try:
        _check_folder("results_dir", cfg.results_dir)
        if cfg.data_dir is not None:
            _check_folder("data_dir", cfg.data_dir, must_exist=True)
        root = resolve_data_dir(cfg.data_dir)
        if cfg.task.kind == "lmeval" and cfg.task.include_path:
            from quanteval.evaluate import check_include_path

            check_include_path(cfg.task.include_path)
        if cfg.model.source == "hf" and Path(cfg.model.name_or_path).is_file():
            raise ValueError(f"model.name_or_path={cfg.model.name_or_path}: is a file; give a model folder or a hub id")
        if hasattr(cfg.task, "file"):
            data_file(root, cfg.task.file)
        if isinstance(cfg.task, C.LongWikiText2Config):
            _check_long_window(cfg, root)
        from quanteval.methods import METHODS

        if cfg.method.quantizes and METHODS[cfg.method.name].needs_calibration:
            c = cfg.calibration
            _check_calibration(c.dataset, c.path, root)
        if cfg.method.name == "llmcompressor":
            _check_llmcompressor(cfg)
        method = METHODS[cfg.method.name]
        if method is not None:
            missing = method.missing_library()
            if missing:
                raise ValueError(f"method={cfg.method.name}: {missing}")
            # method=mixed makes what its base makes (over hqq: float zeros)
            made_by = cfg.method.base if cfg.method.name == "mixed" else cfg.method.name
            if cfg.runtime == "packed" and not (method.affine and METHODS[made_by].affine):
                raise ValueError(f"runtime=packed: method={made_by} makes a non-affine result (a library "
                                 f"format), which packed integer kernels cannot hold; use runtime=fakequant")
        if cfg.task.kind == "generative":
            from quanteval.evaluate import task_for

            _check_task_data(cfg.task.name, root)
            task_for(cfg.task).limit(cfg)  # no limit for this preset: one line, now
            _check_task_options(cfg)
        if cfg.runtime == "packed" and cfg.method.quantizes:
            from quanteval.models import resolve_device
            from quanteval_kernels import resolve_backend

            try:
                resolve_backend(cfg.kernel, resolve_device(cfg.device))
            except RuntimeError as e:
                raise ValueError(f"runtime=packed kernel={cfg.kernel}: {e}; or set kernel=torch") from None
        if cfg.model.source == "gguf_package":
            from quanteval.models import check_gguf, gguf_path

            check_gguf(gguf_path(cfg.model))
        if cfg.kv_bits != 16:
            _check_kv(cfg.model, cfg.kv_bits, cfg.kv_group_size, cfg.kv_method)
        if cfg.method.name == "artifact":  # the file, then the file against its base: before any heavy work
            from quanteval.artifacts import inspect
            from quanteval.methods.artifact import check_base

            check_base(inspect(cfg.artifact), cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


_KV_CHECKED: set = set()


def _check_kv(model_cfg, bits: int, group_size: int, method: str) -> None:
    """The model's KV cache layout is one ``quanteval.kvcache`` handles, and its head dimension takes the
    value groups (from the model's config only; once per model and KV settings)."""
    from quanteval.kvcache import check
    from quanteval.kvsize import KVSpec
    from quanteval.models import model_config

    key = (repr(model_cfg), bits, group_size, method)
    if key not in _KV_CHECKED:
        check(model_config(model_cfg), KVSpec(bits, group_size, method))
        _KV_CHECKED.add(key)


@lru_cache(maxsize=None)
def _check_calibration(dataset: str, path: str | None, root: Path) -> None:
    """The calibration files parse, and hold no item that a task evaluates (ValueError naming the task);
    once per calibration set, not once per job."""
    from quanteval.calibration import MIX, calibration_file, leaked_item, read_text

    if path is not None and Path(path).is_dir():
        raise ValueError(f"calibration.path={path}: is a folder; give a .jsonl or .txt file")
    names = MIX if (path is None and dataset == "mix") else (dataset,)
    files = [calibration_file(n, path, root) for n in names]
    for f in files:
        read_text(f)  # empty / malformed: one line, now
        leak = leaked_item(f, _task_data_files(root))
        if leak:
            task, data, line, cline = leak
            what = f"calibration.path={path}" if path else f"calibration.dataset={dataset}"
            raise ValueError(f"{what}: {f.name} line {cline} is an item that task {task} evaluates ({data} line "
                             f"{line}); calibrating on test items inflates its scores: remove it or calibrate on "
                             f"other text")


@lru_cache(maxsize=None)
def _task_data_files(root: Path) -> dict[str, Path]:
    """Each generative task's local data file (tasks whose module names one in ``DATA`` and that exist)."""
    from quanteval_tasks import load_module, task_table

    out = {}
    for name, info in task_table().items():
        rel = getattr(load_module(info), "DATA", None)
        if rel and (root / rel).exists():
            out[name] = root / rel
    return out


def _check_llmcompressor(cfg: C.RunConfig) -> None:
    """method=llmcompressor: its venv exists, and AWQ has a GPU (ValueError, one line)."""
    from quanteval.methods.llmcompressor import LLMCompressorError, venv_python
    from quanteval.models import resolve_device

    if cfg.method.modifier == "awq" and resolve_device(cfg.device).type != "cuda":
        raise ValueError("method=llmcompressor method.modifier=awq: llm-compressor's AWQModifier needs a GPU "
                         "(on a CPU it stops with 'Cannot access accelerator device when none is available'); "
                         "run it with device=cuda on a GPU machine")
    if cfg.quantize_embeddings:
        raise ValueError("method=llmcompressor: quantize_embeddings=true is not supported (its recipe ignores lm_head)")
    try:
        venv_python()
    except LLMCompressorError as e:
        raise ValueError(str(e)) from None


def _model_window_tokenizer(model: str):
    """A model config (as JSON), its ``max_position_embeddings`` and its tokenizer, without its weights."""
    import json

    from quanteval.models import load_tokenizer, model_config, tokenizer_source

    model_cfg = C.ModelConfig(**json.loads(model))
    window = getattr(model_config(model_cfg), "max_position_embeddings", None)
    return model_cfg, window, load_tokenizer(tokenizer_source(model_cfg), model_cfg.trust_remote_code)


def _check_long_window(cfg: C.RunConfig, root: Path) -> None:
    """task=wikitext2_long: its windows fit the model's window, and the file holds them (ValueError)."""
    import dataclasses
    import json

    _long_window_cached(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), str(root), cfg.task.file,
                        cfg.task.seq_len, cfg.task.n_windows)


@lru_cache(maxsize=None)
def _long_window_cached(model: str, root: str, file: str, seq_len: int, n_windows: int) -> None:
    from quanteval.data import data_file

    _, window, tok = _model_window_tokenizer(model)
    if window and seq_len > window:
        raise ValueError(f"task.seq_len={seq_len}: above the model's window (max_position_embeddings={window})")
    have = len(tok(data_file(Path(root), file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    if have < seq_len * n_windows:
        raise ValueError(f"task.n_windows x task.seq_len = {n_windows * seq_len} tokens, but {file} has only {have}")


def _check_task_options(cfg: C.RunConfig) -> None:
    """A long-context task's options against the model (lengths within its window, a haystack long enough),
    through the task module's own ``check_options``; ValueError in one line."""
    import dataclasses
    import json

    from quanteval_tasks import load_module, task_table

    info = task_table()[cfg.task.name]
    if info.model_options and hasattr(load_module(info), "check_options"):
        opts = {**info.options, **dict(cfg.task.options)}
        _check_options_cached(cfg.task.name, json.dumps(opts, sort_keys=True, default=list),
                              json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), cfg.data_dir, cfg.preset.name)


@lru_cache(maxsize=None)
def _check_options_cached(task: str, options: str, model: str, data_dir, preset: str) -> None:
    import json

    from quanteval_tasks import load_module, task_table

    _, window, tok = _model_window_tokenizer(model)
    load_module(task_table()[task]).check_options(json.loads(options), window, tok, data_dir, preset)


@lru_cache(maxsize=None)
def _check_task_data(name: str, root: Path) -> None:
    """A generative task's local data file, when present, verified (checksum) and parsed (file:line errors).

    A missing local file is not an error here: the task falls back to the hub, and says so if that fails.
    """
    from quanteval.data import data_file, read_jsonl

    from quanteval_tasks import load_module, task_table

    rel = getattr(load_module(task_table()[name]), "DATA", None)
    if rel and (root / rel).exists():
        read_jsonl(data_file(root, rel))


class ReportCallback(Callback):
    """Writes the report, and prints a summary, when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from quanteval.report import build, summary

        if "bar" in _BAR:
            _BAR.pop("bar").close()
        sweep = Path(config.results_dir).resolve() / config.sweep_name
        try:
            thresholds = OmegaConf.to_object(config.report)
            if not isinstance(thresholds, Thresholds):
                thresholds = Thresholds(**thresholds)
            report = build(sweep, thresholds=thresholds)
        except Exception as e:  # noqa: BLE001 - Hydra would turn it into a warning; the results are kept
            _FAILED.append(f"report ({_first_line(e)}; rerun quanteval-report {sweep})")
        else:
            print(summary(report.cells))
            for w in report.warnings:
                print(f"quanteval: warning: {w}", file=sys.stderr)
            print(f"quanteval: report written to {report.index}")
        if _FAILED:
            print(f"quanteval: {len(_FAILED)} run(s) failed: {'; '.join(_FAILED)}", file=sys.stderr)


_BAR: dict = {}


def _progress(record: dict) -> None:
    """Advance the sweep's progress bar (runs done of the grid's distinct runs, with time left).

    Only in the process that launched the sweep: jobs on a cluster run elsewhere, and report in
    their own logs."""
    pid, _, total = os.environ.get("QUANTEVAL_SWEEP_RUNS", "").partition(":")
    key = record.get("run_key")
    if not total or pid != str(os.getpid()) or key is None:
        return
    from tqdm.auto import tqdm

    if "bar" not in _BAR:
        _BAR.update(bar=tqdm(total=int(total), desc="sweep", unit="run", position=0), seen=set())
    if key not in _BAR["seen"]:
        _BAR["seen"].add(key)
        _BAR["bar"].update(1)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    from quanteval.sweep import run_job
    from quanteval.variant import Variant

    run_cfg = to_run_config(cfg)
    variant = Variant.of(run_cfg).label
    try:
        record = run_job(run_cfg, _SESSION)
    except WriteError as e:  # e.g. a full disk: nothing half-written; the next job may have room again
        log.error("%s", e)
        _FAILED.append(f"{run_cfg.task.name} {variant} ({e})")
        return
    _progress(record)
    if record["status"] == "failed":
        label = f"{run_cfg.task.name} {variant} ({record.get('error')})"
        if label not in _FAILED:  # the same run reached twice (e.g. the baseline under each bits value)
            _FAILED.append(label)


OPEN_DICTS = ("preset.limits.", "preset.max_new_tokens.", "report.chance.")  # per-task entries users add


def _open_dict_overrides(args: list[str]) -> list[str]:
    """``preset.limits.<task>=N`` (and the other per-task dicts) adds or replaces the entry: the preset files
    list no tasks (each task's YAML sizes itself), so Hydra's ``++`` (add or override) is implied."""
    return [f"++{a}" if a.startswith(OPEN_DICTS) else a for a in args]


def _no_type_lines(cfgs: list[C.RunConfig]) -> list[str]:
    """'bnb w3 (no type): <why>' for each grid cell a typed method has no type for (skipped, not substituted)."""
    from quanteval.variant import Variant

    lines = []
    for cfg in cfgs:
        v = Variant.of(cfg)
        line = f"{v.label}: {v.no_format}"
        if v.no_format is not None and line not in lines:
            lines.append(line)
    return lines


def main() -> None:
    """Console entry point: validate the whole grid, then hand over to Hydra."""
    sys.argv = sys.argv[:1] + _open_dict_overrides(sys.argv[1:])
    args = sys.argv[1:]
    plan = [a for a in args if a.split("=", 1)[0] == "plan"]
    if plan:  # plan=true: print what the sweep would do, run nothing
        args = [a for a in args if a not in plan]
        sys.argv = sys.argv[:1] + args
    if not any(a.startswith("-") for a in args):  # --help, --cfg, -m ... go straight to Hydra
        try:
            if plan and plan[-1].split("=", 1)[1].lower() not in ("true", "false"):
                raise UsageError(f"{plan[-1]}: plan must be true or false")
            _check_group_values(args)
            _check_environment()
            if not plan:
                _check_launcher(args)
            jobs, cfgs, n_run, results_dir = expand_grid(args)
        except UsageError as e:
            print(f"quanteval: error: {e}", file=sys.stderr)
            sys.exit(2)
        if plan and plan[-1].split("=", 1)[1].lower() == "true":
            from quanteval.plan import plan as make_plan

            print(make_plan(cfgs))
            return
        print(f"quanteval: {len(jobs)} job(s) validated: {n_run} distinct run(s) in this preset's grid",
              file=sys.stderr)
        for line in _no_type_lines(cfgs):
            print(f"quanteval: skipped {line}", file=sys.stderr)
        os.environ["QUANTEVAL_SWEEP_RUNS"] = f"{os.getpid()}:{n_run}"  # the in-process sweep's progress bar
        if not any(a.split("=", 1)[0].lstrip("+~") == "hydra/launcher" for a in args):
            _SESSION.grid = cfgs  # the jobs run in this process: a variant's tasks can share a generation batch
        if any(a.split("=", 1)[0].lstrip("+~") == "bits" for a in args):
            sys.argv.append("use_preset_grid=false")  # the user chose the bits: run exactly those
        if not Path(results_dir).is_absolute():  # jobs on a cluster start in other directories
            sys.argv.append(f"results_dir={Path(results_dir).resolve()}")
    _job()
    if _FAILED:
        sys.exit(1)


def export_main(argv: list[str] | None = None) -> int:
    """Console entry point ``quanteval-export <run file or run key> --out DIR`` (see ``quanteval.export``)."""
    import argparse

    from quanteval.export import ExportError, export

    ap = argparse.ArgumentParser(prog="quanteval-export",
                                 description="Export a run's quantised model as a compressed-tensors checkpoint.")
    ap.add_argument("run", help="a run file (<results>/<sweep>/runs/*.json) or a run key (prefix)")
    ap.add_argument("--out", required=True, type=Path, help="output directory for the checkpoint")
    ap.add_argument("--results-dir", default="results", type=Path, help="where to look up a run key")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export(args.run, args.out, args.results_dir)
    except ExportError as e:
        print(f"quanteval-export: error: {e}", file=sys.stderr)
        return 2
    print(f"quanteval-export: wrote {path}")
    return 0


REPORT_PROG = "quanteval-report"


class _ReportUsage(Exception):
    """Raised instead of argparse's exit so that every error of ``quanteval-report`` is one line on stderr."""


def _report_parser():
    import argparse

    from quanteval.report import FAIL_LEVELS

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise _ReportUsage(message)

    def as_typed(kind: type):
        """Checks the text reads as ``kind`` but keeps the text, so that a range error quotes the value as
        typed (``--survives=2``, not ``2.0``)."""
        def check(text: str) -> str:
            kind(text)  # a ValueError reads "argument --x: invalid float value: 'y'"
            return text

        check.__name__ = kind.__name__
        return check

    p = Parser(prog=REPORT_PROG,
               description="Write the report (index.html, charts, item pages, exports) of a quanteval sweep.")
    p.add_argument("sweep_dir", type=Path, help="sweep folder holding runs/*.json")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep_dir>/report)")
    p.add_argument("--fail-on", choices=sorted(FAIL_LEVELS), default=None,
                   help="exit 1 when any deciding cell collapses (or degrades), CI included")
    for name, default, help_ in Thresholds.flags():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=as_typed(type(default)), default=None,
                       help=f"{help_} (default: {default})")
    return p


def _report_thresholds(args) -> Thresholds:
    """The thresholds the flags set (the others keep their defaults); a bad value names its flag."""
    from quanteval.thresholds import ThresholdError

    kinds = {name: type(default) for name, default, _ in Thresholds.flags()}
    given = {name: getattr(args, name) for name in kinds if getattr(args, name) is not None}
    try:
        return Thresholds(**{name: kinds[name](text) for name, text in given.items()})
    except ThresholdError as e:
        raise _ReportUsage(ThresholdError(e.name, given.get(e.name, e.value), e.rule).flag()) from None


def report_main(argv: list[str] | None = None) -> int:
    """Console entry point ``quanteval-report SWEEP_DIR [--out DIR] [--fail-on LEVEL] [--<threshold> X]``.

    Builds the report and prints the path of its index.html; 2 on bad input, 1 when --fail-on matches.
    ``argv`` defaults to ``sys.argv[1:]``; errors and warnings go to stderr, one line each::

        report_main(["results/default", "--fail-on", "collapses", "--kl-survives", "0.05"])
    """
    from quanteval.report import build, failing

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _report_parser().parse_args(argv)
        report = build(args.sweep_dir, args.out, _report_thresholds(args))
    except (_ReportUsage, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"{REPORT_PROG}: error: {message}", file=sys.stderr)
        return 2
    for w in report.warnings:
        print(f"{REPORT_PROG}: warning: {w}", file=sys.stderr)
    print(report.index)
    if args.fail_on:
        bad = failing(report.cells, args.fail_on)
        if bad:
            names = ", ".join(sorted({f"{c.row} {c.label} ({c.verdict})" for c in bad})[:10])
            print(f"{REPORT_PROG}: {len(bad)} cell(s) match --fail-on {args.fail_on}: {names}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    main()
