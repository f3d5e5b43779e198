"""quanteval: what does compressing an LLM's weights to N bits with method M cost, and on which work?

The package is laid out as ``../shared/STYLE.md`` suggests:

- ``cli``          the only module that imports Hydra/OmegaConf
- ``config``       typed dataclass schemas, validated in ``__post_init__``
- ``sweep``        runs one job of the grid; process-level caches; resume
- ``models``       model loading (GGUF packages, hub ids, local dirs) and the architecture adapter table
- ``primitives``   pure tensor quantisation functions (no nn.Module, no I/O)
- ``methods``      compute a quantisation result per method, and the one function that applies any result
- ``evaluate``     scoring tasks (language-model fidelity first)
- ``results``      the on-disk results store and ``load()``
- ``report``       reads results only (never imports torch) and writes HTML/PNG

Importing ``quanteval`` itself is cheap and does not import torch.
"""

__version__ = "0.2.0"
