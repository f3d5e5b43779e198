"""quanteval's task definitions: lm-eval YAML files with their Python loaders and scorers beside them.

Installed as ``quanteval_tasks``. Each task is ``<name>.yaml`` (an lm-eval task named
``quanteval_<name>``) plus ``<name>.py``. lm-eval loads the YAML's ``!function`` references by
file path, so the modules import shared code absolutely (``quanteval_tasks.common``), never
relatively. ``lm_eval.tasks.TaskManager(include_path=TASK_DIR)`` finds every task here.
"""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
