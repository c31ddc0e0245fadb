"""The `train.py` command line: LightningCLI with YAML configs, dotted overrides and omegaconf interpolation.

`python train.py --config X.yaml` runs `fit` (the subcommand may be omitted); `validate`, `test` and
`predict` work as usual. Every run gets its own folder `<trainer.default_root_dir>/version_N` holding the
resolved config, the W&B files, checkpoints, the poison manifest and the export.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

from callbacks import DivergenceGuard, ExportOnFitEnd, GlobalRNGState, PoisonSampleGrid, RunSummary
from mmbackdoor_cli.errors import DEBUG_ENV, check_config_files, debug_enabled, format_error, project_error
from mmbackdoor_cli.wandb_mode import GROUP_ENV, ensure_safe_wandb_mode, finish_wandb_runs

SUBCOMMANDS = ("fit", "validate", "test", "predict")

# main() passes sys.argv on itself (with the default subcommand), which LightningCLI warns about
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
RUN_DIR_ENV = "MMBACKDOOR_RUN_DIR"
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "mmbackdoor"},
}


def with_default_subcommand(args: list[str]) -> list[str]:
    """Insert `fit` unless a subcommand (or a top-level help/version flag) is given."""
    if args and (args[0] in SUBCOMMANDS or args[0] in ("-h", "--help", "--version")):
        return args
    return ["fit", *args]


def next_run_dir(root: Path) -> Path:
    """`root/version_N` with N one more than the largest existing one (not created: see `allocate_run_dir`)."""
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]
    return root / f"version_{max(versions, default=-1) + 1}"


def allocate_run_dir(root: Path, attempts: int = 1000) -> Path:
    """Create and return a new `root/version_N` (the next free N), atomically.

    The folder is claimed by `mkdir(exist_ok=False)`: when another run started at the same moment took N
    first, this one moves on to N+1, so two runs never share a folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    n = -1
    for _ in range(attempts):
        n = max(n + 1, int(next_run_dir(root).name.split("_")[1]))
        candidate = root / f"version_{n}"
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{root}: no free version_N folder after {attempts} attempts (last tried {n})")


RUN_ARTIFACTS = ("config.yaml", "export", "checkpoints", "poison_manifest.json")


def check_fresh_run_dir(run_dir: Path) -> None:
    """A run with `--run_version_dir=false` must not write into a folder that holds a previous run.

    Checked before anything is built, so the run fails at once instead of overwriting the old
    `config.yaml` and failing at export time, after the whole training.
    """
    found = [name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if found:
        raise FileExistsError(
            f"{run_dir} already holds a previous run ({', '.join(found)}) and run_version_dir=false would "
            "overwrite it: pass another --trainer.default_root_dir, or --run_version_dir=true (the default) "
            f"to put this run in a new {run_dir}/version_N"
        )


class MMBackdoorCLI(LightningCLI):
    """LightningCLI with mmbackdoor's defaults: run folders, offline-safe W&B, export and summary callbacks."""

    def __init__(self, *args, instantiate: bool = True, **kwargs) -> None:
        self._instantiate = instantiate
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER, "default_root_dir": "runs/default"})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_version_dir",
            type=bool,
            default=True,
            help="put this run in <trainer.default_root_dir>/version_N (false: use the folder as is)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        root = Path(trainer.default_root_dir or "runs/default")
        if os.environ.get("LOCAL_RANK", "0") != "0":
            # a DDP child re-running this script: rank 0's folder (created and checked by rank 0). Without
            # RUN_DIR_ENV (a launcher other than Lightning's) as before: the next free folder, not claimed
            fallback = next_run_dir(root) if config.run_version_dir else root
            run_dir = Path(os.environ.get(RUN_DIR_ENV) or fallback)
            if self._instantiate:
                run_dir.mkdir(parents=True, exist_ok=True)
        else:
            if config.run_version_dir:
                run_dir = allocate_run_dir(root) if self._instantiate else next_run_dir(root)
            else:
                run_dir = root
                if self.subcommand == "fit":
                    check_fresh_run_dir(run_dir)
                if self._instantiate:
                    run_dir.mkdir(parents=True, exist_ok=True)
            os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP processes Lightning launches
        trainer.default_root_dir = str(run_dir)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            class_path = getattr(logger, "class_path", "") if logger not in (None, True, False) else ""
            if class_path.endswith("WandbLogger"):
                ensure_safe_wandb_mode()
                logger.init_args.save_dir = str(run_dir)
                if getattr(logger.init_args, "name", None) is None:
                    logger.init_args.name = f"{root.name}/{run_dir.name}"
                if getattr(logger.init_args, "group", None) is None and os.environ.get(GROUP_ENV):
                    logger.init_args.group = os.environ[GROUP_ENV]

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (list, tuple)) or args is None:
            check_config_files(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        if not self._instantiate:
            return
        try:
            super().instantiate_classes()
        except Exception as exc:
            error = None if debug_enabled() else project_error(exc)
            if error is None or error is exc:
                raise
        else:
            error = None
        if error is not None:
            # the constructor's own error, without jsonargparse's wrapping (MMBACKDOOR_DEBUG=1 keeps it)
            error.__cause__, error.__context__, error.__suppress_context__ = None, None, True
            raise error
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.trainer.mmbackdoor_config = _to_dict(config)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the stage, then finish its W&B run (exit code 1 when the stage raised) so that the next
        stage in this process starts a run of its own."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            finish_wandb_runs(self.trainer.loggers, exit_code=1)
            raise
        finish_wandb_runs(self.trainer.loggers, exit_code=0)

    def _instantiate_trainer(self, config, callbacks):
        present = list(config.get("callbacks") or []) + list(callbacks)
        run_dir = Path(config["default_root_dir"])
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in present
        ):
            # rich bars redraw in place: right for a terminal; logs and CI get plain tqdm lines instead
            callbacks.append(
                RichProgressBar(leave=True) if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=10)
            )
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in present
        ):
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True))
        for cls in (DivergenceGuard, ExportOnFitEnd, PoisonSampleGrid, RunSummary, GlobalRNGState):
            if not any(isinstance(c, cls) for c in present):
                callbacks.append(cls())
        return super()._instantiate_trainer(config, callbacks)


def _to_dict(namespace) -> dict:
    from jsonargparse import Namespace

    def convert(value):
        if isinstance(value, Namespace):
            return {k: convert(v) for k, v in vars(value).items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)

    return convert(namespace)


def main(args: list[str] | None = None, run: bool = True) -> MMBackdoorCLI:
    """The Python API of train.py; `args` defaults to sys.argv[1:]. Errors propagate as exceptions
    (a constructor's own ValueError, not jsonargparse's wrapper); `command_line` prints them instead."""
    args = with_default_subcommand(list(sys.argv[1:] if args is None else args))
    if not run:
        args = args[1:] if args and args[0] in SUBCOMMANDS else args
    return MMBackdoorCLI(args=args, run=run)


def command_line(argv: list[str] | None = None) -> None:
    """`python train.py ...`: `main`, with the project's own errors printed as a short `error:` report and
    exit status 2 (like a bad argument). `--debug` (anywhere) or MMBACKDOOR_DEBUG=1: the full traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # also seen by the DDP processes Lightning launches
    try:
        main(argv)
    except Exception as exc:
        error = None if debug_enabled() else project_error(exc)
        if error is None:
            raise
        print(format_error(error), file=sys.stderr)
        raise SystemExit(2) from None
