"""``tailgen``: the command line (LightningCLI) for fit / predict / test.

    tailgen predict --config configs/fashion/default.yaml --data.num_samples 64 --writer.output_dir out
    tailgen test    --config configs/fashion/tail.yaml --config configs/fashion/eval.yaml --model.guidances.x0.init_args.scale=0.1
    tailgen fit     --config configs/fashion/train_diffusion.yaml   # trains; re-running resumes (ckpt_path: last)
    tailgen sweep   configs/sweeps/fashion_tail.yaml        # a W&B sweep file, run locally (tailgen/sweep.py)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

import tailgen
import tailgen.guidance  # noqa: F401  (registers guidance classes for short class_path names)
from tailgen.module.progress import SampleProgressBar
from tailgen.module.run_folder import claim_logger_version, config_name, run_folder, run_name
from tailgen.module.writer import SampleWriter
from tailgen.utils import ConfigError, TailgenError
from tailgen.utils.io import atomic_write


class LogConfigCallback(SaveConfigCallback):
    """Saves the resolved config.yaml into the run's own folder and, on W&B, the whole resolved config (rank 0).

    predict: the writer writes it into writer.output_dir, once the folder is known to be this config's (it may
    refuse the folder); test: beside metrics.json (``module/run_folder.py``; ``test_config.yaml`` when that is a
    predict's output folder); fit: Lightning's place (the log dir)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("predict", "test"):
            return super().setup(trainer, pl_module, stage)
        if self.already_saved:
            return
        folder = None
        if stage == "test":  # every rank: the run folder is decided (and broadcast) here
            has_output = getattr(pl_module, "evaluation", None) is not None and hasattr(pl_module, "metrics_path")
            folder = pl_module.metrics_path().parent if has_output else run_folder(trainer)
        if trainer.is_global_zero:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                text = self.parser.dump(self.config, skip_none=False)
                atomic_write(folder / config_name(folder, stage), lambda tmp: tmp.write_text(text))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


_GUIDANCE_ARG = re.compile(r"--model\.(?:init_args\.)?guidances\.([^.=\s]+)(\.[^=\s]*)?(?:=|$)")
_BASE_GUIDANCE = {"tailgen.Guidance", "tailgen.guidance.Guidance", "tailgen.guidance.base.Guidance", "Guidance"}


def check_guidance_names(args: list[str], guidances) -> None:
    """ConfigError for ``--model.init_args.guidances.NAME.init_args...`` where NAME is not a configured guidance
    and no class_path is given: jsonargparse would silently add a no-op base ``Guidance`` (a typo's result)."""
    guidances = dict(guidances or {})
    given: dict[str, bool] = {}  # name -> a class_path (or a whole value) was given on the command line
    for arg in args:
        if m := _GUIDANCE_ARG.match(arg):
            name, rest = m.group(1), m.group(2) or ""
            given[name] = given.get(name, False) or rest in ("", ".class_path")
    for name, explicit in given.items():
        entry = guidances.get(name)
        class_path = getattr(entry, "class_path", None) if entry is not None else None
        if explicit or class_path not in _BASE_GUIDANCE:
            continue
        configured = [n for n, g in guidances.items() if getattr(g, "class_path", None) not in _BASE_GUIDANCE]
        raise ConfigError(
            f"model.init_args.guidances.{name}: no guidance named {name!r} is configured (configured: "
            f"{', '.join(configured) or 'none'}) and no class_path was given: fix the name, or add "
            f"--model.init_args.guidances.{name}.class_path=<a guidance class, e.g. tailgen.guidance.ClassifierGuidance>"
        )


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` values of a command line, in order."""
    files = []
    for k, arg in enumerate(args):
        if arg == "--config" and k + 1 < len(args):
            files.append(args[k + 1])
        elif arg.startswith("--config="):
            files.append(arg[len("--config="):])
    return files


_LOGGER_NAME_ARG = re.compile(r"--trainer\.logger\.(?:init_args\.)?name(?:=|$)")


def wandb_name_given(args: list[str]) -> bool:
    """True if the command line names the W&B run: ``--trainer.logger[.init_args].name``, or a ``--config`` file
    whose ``trainer.logger`` is a WandbLogger with a name. A name that jsonargparse carried over from another logger
    class (eval.yaml's CSVLogger ``name: fashion_test``) is not one given for W&B."""
    if any(_LOGGER_NAME_ARG.match(arg) for arg in args):
        return True
    if any(arg.startswith("--trainer.logger=") and re.search(r"\bname\W*[:=]", arg) for arg in args):
        return True  # the logger as one inline YAML / JSON value
    for path in config_files(args):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        logger = (data.get("trainer") or {}).get("logger") if isinstance(data, dict) else None
        if isinstance(logger, dict) and "Wandb" in str(logger.get("class_path")) and (logger.get("init_args") or {}).get("name"):
            return True
    return False


class TailgenCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        self.raw_args = list(sys.argv[1:] if kwargs.get("args") is None else kwargs["args"])
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        model = config.get("model")
        if model is not None and model.get("init_args") is not None:
            check_guidance_names(self.raw_args, model.init_args.get("guidances"))
            data = config.get("data")
            samples = data.get("init_args", {}).get("samples") if data is not None else None
            if self.subcommand == "test" and samples is not None and model.get("class_path", "").endswith("GuidedDiffusion"):
                # evaluating existing samples: no diffusion network (nor classifier / guidances) is built or loaded
                for key in ("network", "classifier", "unconditional", "guidances"):
                    model.init_args[key] = None
        self._name_wandb_run(config)

    def _name_wandb_run(self, config) -> None:
        """A W&B run not named on the command line gets ``<config stem>-<guidances>-<time>`` (``run_name``)."""
        trainer = config.get("trainer") or {}
        logger = trainer.get("logger") if hasattr(trainer, "get") else None
        if not hasattr(logger, "get") or "Wandb" not in str(logger.get("class_path")) or wandb_name_given(self.raw_args):
            return
        files = [f for f in config_files(self.raw_args) if os.path.isfile(f)]
        stem = Path(files[0]).stem if files else "tailgen"
        model, data = config.get("model") or {}, config.get("data") or {}
        guidances = (model.get("init_args") or {}).get("guidances") if hasattr(model, "get") else None
        samples = (data.get("init_args") or {}).get("samples") if hasattr(data, "get") else None
        if logger.get("init_args") is None:
            logger.init_args = Namespace()
        logger.init_args.name = run_name(stem, guidances, samples)

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"tailgen {tailgen.__version__}")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        # The sample writer is always there on predict; its options are --writer.*.
        parser.add_lightning_class_args(SampleWriter, "writer")

    def before_fit(self) -> None:
        if not is_overridden("training_step", self.model):
            raise ConfigError(
                f"tailgen fit trains tailgen's own models (model.class_path tailgen.module.train.DiffusionTrainer or "
                f"ClassifierTrainer, e.g. configs/fashion/train_diffusion.yaml); {type(self.model).__name__} has "
                "nothing to train: run this config with `tailgen predict` or `tailgen test`"
            )
        if str(self.config["fit"].get("ckpt_path")) == "last":  # the training configs resume by default
            dirs = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            if not any(True for d in dirs for _ in d.glob("last*.ckpt")):
                rank_zero_info(f"tailgen fit: no last.ckpt in {', '.join(sorted({str(d) for d in dirs})) or '-'} "
                               "yet: starting a new run")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # predict / test: one bar over samples (with the sampler step) instead of Lightning's bar over batches;
        # --trainer.enable_progress_bar=false still silences it.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.subcommand in ("predict", "test") and trainer_config.get("enable_progress_bar") is not False:
            callbacks = kwargs.get("callbacks") or trainer_config.get("callbacks") or []
            kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), SampleProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # tailgen prints its own metrics table (GuidedDiffusion.on_test_epoch_end): not Lightning's too.
        if subcommand == "test":
            kwargs["verbose"] = False
        # The writer keeps every sample on disk; holding them all in RAM too (Lightning's default) does not scale.
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        return kwargs

    def _give_writer_the_config(self) -> None:
        # The writer hashes the resolved config into samples.json (resume / refuse another config's folder) and
        # writes it as config.yaml beside the samples.
        text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        for callback in self.trainer.callbacks:
            if isinstance(callback, SampleWriter):
                callback.run_config, callback.config_text = yaml.safe_load(text), text
        claim_logger_version(self.trainer)  # a CSV logger's version_N: claimed, not raced for

    before_predict = before_test = _give_writer_the_config


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


def _type_names(subtypes: str) -> list[str]:
    """"[<class 'str'>, <class 'int'>, list[int]]" -> ["str", "int", "list[int]"] (top-level commas only)."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", subtypes.strip()[1:-1])
    names, depth, start = [], 0, 0
    for k, char in enumerate(text + ","):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(text[start:k].strip())
            start = k + 1
    return [name for name in names if name]


def condense_parser_error(message: str) -> str:
    """jsonargparse reports a bad value through nested union attempts; keep the dotted key and the root cause:
    ``model.guidances.cg.scale: Expected a <class 'float'>. Got value: strong``; for a value that fits none of
    a union's types: ``data.labels: got ['a'], expected one of str, int, list[int] (...)``."""
    path: list[tuple[int, str]] = []
    class_path: Optional[tuple[int, str]] = None
    subtypes: Optional[tuple[int, str]] = None
    lines = message.splitlines()
    for n, line in enumerate(lines):
        text = line.strip().lstrip("-").strip()
        indent = len(line) - len(line.lstrip(" -"))
        if text.startswith("Subtypes:"):  # a real union (two or more types besides None), not Optional[X]
            names = [name for name in _type_names(text[len("Subtypes:"):]) if name != "NoneType"]
            subtypes = (indent, ", ".join(names)) if len(names) >= 2 else None
        if not text or text.startswith(_NOISE):
            continue
        if m := re.match(r'Parser key "(.+)":$', text):
            path = [p for p in path if p[0] < indent] + [(indent, m.group(1))]
        elif m := re.match(r"Problem with given class_path '(.+)':$", text):
            class_path = (indent, m.group(1))
        else:
            keys = ".".join(k for i, k in path if i < indent)
            where = f" (class_path {class_path[1]})" if class_path and class_path[0] < indent else ""
            if subtypes is not None and path and subtypes[0] > path[-1][0]:
                given = next((rest.strip()[len("Given value:"):].strip() for rest in lines[n:]
                              if rest.strip().startswith("Given value:")), "?")
                text = f"got {given}, expected one of {subtypes[1]}"
            return f"{keys}{where}: {text}" if keys else text
    return message.strip()


def check_config_files(args: list[str]) -> None:
    """ConfigError for a ``--config`` file that is missing or not valid YAML, with file, line and column
    (jsonargparse reports only the parser's complaint)."""
    for path in config_files(args):
        if not os.path.isfile(path) and any(c in path for c in ":{\n"):
            continue  # jsonargparse also takes inline YAML / JSON as --config
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(error, "problem", None) or error).split())
            context = getattr(error, "context", None)
            raise ConfigError(f"YAML syntax error in {path}{where}: {problem}"
                              + (f" ({context})" if context else "")) from None


class _DropTips(logging.Filter):
    """Lightning's "💡 Tip: try installing litlogger / litmodels" adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence Lightning's adverts and known deprecation noise that a tailgen user can do nothing about."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # torch pytree, via Lightning
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    # the training configs set ckpt_path: last; TailgenCLI.before_fit says so plainly on a first run
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``tailgen`` command: a bad configuration or a TailgenError ends it with one clear
    line on stderr and exit code 2. ``tailgen sweep ...`` runs a W&B sweep file locally (tailgen/sweep.py)."""
    if (sys.argv[1:] if args is None else args)[:1] == ["sweep"]:
        from tailgen.sweep import main as sweep

        return sweep((sys.argv[1:] if args is None else args)[1:])
    quiet_lightning()
    try:
        check_config_files(sys.argv[1:] if args is None else list(args))
        run_cli(args)
    except ArgumentError as exc:
        print(f"tailgen: error: {condense_parser_error(str(exc))}\n(see `tailgen <subcommand> --help`)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        error = _tailgen_error(exc)
        if error is None and isinstance(exc, MisconfigurationException):  # Lightning's own config complaints
            error = str(exc).strip()
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
