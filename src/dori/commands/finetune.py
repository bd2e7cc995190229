"""``dori finetune adversarial|esd|ca|siss``: weight-changing mitigations; the result loads with ``--model DIR``.

One sub-command per method, each in its own module with only its own options (``dori finetune esd --help``):

* ``adversarial``: adversarial fine-tuning (Finding Dori, Algorithm 2), :mod:`dori.commands.finetune_adversarial`.
* ``esd``: ESD erasing each memorized prompt, :mod:`dori.commands.finetune_esd`.
* ``ca``: Concept Ablation onto anchor prompts, :mod:`dori.commands.finetune_ca`.
* ``siss``: SISS per item, one model per item under ``OUT/<item id>/``, :mod:`dori.commands.finetune_siss`.

The baselines follow their reference code by default; the Finding Dori paper's settings are the named
variant ``--variant paper`` (SISS also ``--variant surrogates``), never mixed in silently. Every option left
out takes the method's own default (the classes' docstrings; ``docs/results/baselines_parity.md``); the
miniworld values of the paper's tables are in ``experiments/tables3_5_baselines.py``.
"""

from __future__ import annotations

from dori.commands import finetune_adversarial, finetune_ca, finetune_esd, finetune_siss


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model to remove memorized items (writes a model folder)")
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    finetune_adversarial.add_method(methods)
    finetune_esd.add_method(methods)
    finetune_ca.add_method(methods)
    finetune_siss.add_method(methods)
