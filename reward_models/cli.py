"""``rlhf rm train`` and ``rlhf rm eval``: reward models on rankings with ties.

Both take ``--config FILE.yaml`` (presets: ``experiments/configs/rm_tiny.yaml``,
``rm_smollm2.yaml``) plus overrides of any field (``--loss rao_kupper`` or ``loss=rao_kupper``).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from reward_models import evaluate, train

    parser = subparsers.add_parser(
        "rm",
        help="train and evaluate reward models on rankings with ties",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="rm_command", metavar="{train,eval}", required=True)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    return parser
