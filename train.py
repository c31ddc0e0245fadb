#!/usr/bin/env python
"""Train, poison or defend a model from a YAML experiment.

    python train.py --config configs/clip_shapes_badnet.yaml --data.poison_rate=0.02 --trainer.max_epochs=3
    python train.py fit|validate|test --config X.yaml ...
    python train.py --config X.yaml --print_config
    python train.py --config X.yaml --debug   # full tracebacks (also MMBACKDOOR_DEBUG=1)

See README.md and docs/configs.md for every config key.
"""

from mmbackdoor_cli.cli import command_line

if __name__ == "__main__":
    command_line()
