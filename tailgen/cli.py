"""``tailgen``: the command line (LightningCLI) for fit / predict / test.

    tailgen predict --config configs/fashion/default.yaml --data.num_samples 64 --writer.output_dir out
    tailgen test    --config configs/fashion/eval.yaml --model.guidances.tail.init_args.scale=0.5
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

import lightning as L
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

import tailgen
import tailgen.guidance  # noqa: F401  (registers guidance classes for short class_path names)
from tailgen.module.writer import SampleWriter
from tailgen.utils import TailgenError


class LogConfigCallback(SaveConfigCallback):
    """Saves config.yaml into the log dir and, on W&B, the whole resolved config (rank 0 only)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class TailgenCLI(LightningCLI):
    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"tailgen {tailgen.__version__}")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        # The sample writer is always there on predict; its options are --writer.*.
        parser.add_lightning_class_args(SampleWriter, "writer")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # The writer keeps every sample on disk; holding them all in RAM too (Lightning's default) does not scale.
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        return kwargs

    def before_predict(self) -> None:
        # The writer hashes the resolved config into samples.json (resume / refuse another config's folder).
        config = yaml.safe_load(self._parser("predict").dump(self.config["predict"], skip_none=False))
        for callback in self.trainer.callbacks:
            if isinstance(callback, SampleWriter):
                callback.run_config = config


def _tailgen_error(exc: BaseException) -> Optional[TailgenError]:
    """The TailgenError behind ``exc`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TailgenError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_NOISE = ("Does not validate against any", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def condense_parser_error(message: str) -> str:
    """jsonargparse reports a bad value through nested union attempts; keep the dotted key and the root cause:
    ``model.guidances.cg.scale: Expected a <class 'float'>. Got value: strong``."""
    path: list[tuple[int, str]] = []
    class_path: Optional[tuple[int, str]] = None
    for line in message.splitlines():
        text = line.strip().lstrip("-").strip()
        indent = len(line) - len(line.lstrip(" -"))
        if not text or text.startswith(_NOISE):
            continue
        if m := re.match(r'Parser key "(.+)":$', text):
            path = [p for p in path if p[0] < indent] + [(indent, m.group(1))]
        elif m := re.match(r"Problem with given class_path '(.+)':$", text):
            class_path = (indent, m.group(1))
        else:
            keys = ".".join(k for i, k in path if i < indent)
            where = f" (class_path {class_path[1]})" if class_path and class_path[0] < indent else ""
            return f"{keys}{where}: {text}" if keys else text
    return message.strip()


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``tailgen`` command: a bad configuration or a TailgenError ends it with one clear
    line on stderr and exit code 2."""
    try:
        run_cli(args)
    except ArgumentError as exc:
        print(f"tailgen: error: {condense_parser_error(str(exc))}\n(see `tailgen <subcommand> --help`)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        error = _tailgen_error(exc)
        if error is None:
            raise
        print(f"tailgen: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_cli(args: Optional[list[str]] = None) -> TailgenCLI:
    # Console scripts do not put the working directory on sys.path; user guidances live there.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return TailgenCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},
        trainer_defaults={"inference_mode": False},
        args=args,
    )


if __name__ == "__main__":
    main()
