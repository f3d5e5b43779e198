"""Data loading shared by the task modules: local copies first, the hub as a fallback.

Each task's ``docs(data_dir=None, **_)`` returns a list of plain dicts, each with a string
``id``; ``dataset(**kwargs)`` wraps the same docs as a ``datasets.DatasetDict`` with one
``test`` split, which is what lm-eval's ``custom_dataset`` hook expects (lm-eval passes the
task's ``metadata`` as keyword arguments, so both accept and ignore extra keys).

The data directory is resolved by ``quanteval.data.resolve_data_dir``: the ``data_dir``
argument, ``$QUANTEVAL_DATA``, then ``../shared/data``. Files listed in its ``SHA256SUMS`` are
verified. When no local copy exists, ``load_rows`` tries the Hugging Face hub (for machines with
internet); when that fails too, the error names both the local path and the hub set.
"""

from __future__ import annotations

from typing import Callable, Optional


def load_rows(rel: str, data_dir: Optional[str] = None, hub: Optional[tuple] = None,
              from_hub: Optional[Callable[[dict], dict]] = None) -> list[dict]:
    """Rows of ``<data dir>/<rel>`` (JSONL), or of the hub set ``hub = (path, name, split)``.

    ``from_hub`` maps a hub row to the local file's field names. Raises FileNotFoundError or
    ValueError with one line naming the file (and line, for malformed JSON).
    """
    from quanteval.data import data_file, read_jsonl, resolve_data_dir

    try:
        root = resolve_data_dir(data_dir)
        path = data_file(root, rel)
    except FileNotFoundError as local_err:
        if hub is None:
            raise
        try:
            import datasets

            rows = datasets.load_dataset(hub[0], hub[1], split=hub[2])
        except Exception as hub_err:  # noqa: BLE001 - reported with the local error in one line
            raise FileNotFoundError(f"{local_err}; hub fallback {hub[0]} failed too "
                                    f"({type(hub_err).__name__})") from hub_err
        return [from_hub(dict(r)) if from_hub else dict(r) for r in rows]
    return read_jsonl(path)


def to_dataset(docs: list[dict]):
    """The docs as lm-eval's ``custom_dataset`` hook wants them: a DatasetDict with a ``test`` split."""
    import datasets

    if not docs:
        raise ValueError("empty dataset: no documents")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
