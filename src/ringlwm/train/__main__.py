"""Train with a recipe:

    torchrun --nproc_per_node=N -m ringlwm.train RECIPE [--out DIR] [--steps N] [--save-every K] [--restart] [key=value ...]

RECIPE is a YAML or TOML file (see recipes/). Running again with the same --out resumes from the newest
verified checkpoint; the run directory keeps its resolved recipe (recipe.json) and a rerun with another
model, data or stage list is refused, naming the differing keys (more steps continue training: see
ringlwm.train.run_record). --restart discards the run's checkpoints and metrics and starts again.
--steps sets every stage's number of steps (a quick run); key=value overrides any field
(``optim.weight_decay=0``, ``stages.0.lr=3e-4``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from ringlwm.train.config import load_config
from ringlwm.train.trainer import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--steps", type=int, default=None, help="steps of every stage")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every K steps")
    parser.add_argument("--restart", action="store_true",
                        help="discard the run directory's checkpoints, metrics and hf/ and train from the start")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after the options
    config = load_config(args.recipe, args.overrides)
    if args.steps is not None:
        for stage in config.stages:
            stage.steps = args.steps
            stage.warmup_steps = min(stage.warmup_steps, args.steps)
            stage.__post_init__()
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    try:
        train(config, out, save_every=args.save_every, restart=args.restart)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
