"""A script's run: the command line, paths, seeding, the device, torchrun, and logging.

Every script's ``__main__`` is :func:`run_script`: it reads ``-opt PATH`` (default: the repo's
``Implementation.json``), ``-profile NAME`` and ``-set KEY=VALUE``, checks the settings and hands
``main`` one typed :class:`options.blocks.Settings`, so that a bad value stops the script with one
line naming the key, not a traceback deep inside torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from options.base import DEFAULT_SETTINGS, REPO_ROOT, MissingFileError, SettingsError, resolve_path  # noqa: F401
from options.blocks import Settings, help_lines
from options.loading import as_dict, load_settings
from options.results import DETAIL, is_interactive


def script_settings(description: str, argv: list[str] | None = None) -> Settings:
    """Parse ``-opt`` / ``-profile`` and return validated settings; exit with one line on error.

    Spyder's run button passes no arguments, so every flag is optional. Unknown arguments (IPython's
    own) are ignored.
    """
    side = "ffdnet" if "ffdnet_test" in os.path.abspath(sys.argv[0] if sys.argv else "") else "mnist"
    settings_help = [line for line in help_lines() if line.startswith(("  output_dir", "  threads", "  profile",
                                                                        f"  {side}."))]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="settings (key = default: meaning):\n" + "\n".join(settings_help))
    parser.add_argument("-opt", default=DEFAULT_SETTINGS,
                        help="settings file (JSON with // comments); a relative path is taken from the "
                             "current directory")
    parser.add_argument("-profile", default=None, help="profile to apply, e.g. quick or report")
    parser.add_argument("-debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("-set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one setting, e.g. -set 'mnist.test_ids=[42]' (repeatable; the value is JSON, "
                             "a bare word a string; checked like the file's; wins over files and profiles)")
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown and not is_interactive():  # Spyder/IPython pass arguments of their own: ignored there
        import difflib
        close = difflib.get_close_matches(unknown[0], ["-opt", "-profile", "-set", "-debug"], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else " (valid: -opt PATH, -profile NAME, -set KEY=VALUE)"
        print(f"error: unknown argument {unknown[0]}{hint}", file=sys.stderr)
        raise SystemExit(2)
    path = os.path.abspath(args.opt)  # relative to where the user typed it, not the repo
    return settings_or_exit(lambda: load_settings(path, args.profile, assignments=args.set))


DEBUG = "-debug" in sys.argv  # show tracebacks (the console gets one line otherwise)


def settings_or_exit(make: Callable[[], Any]) -> Any:
    """Run ``make``; a settings, missing-file or unreadable-file error becomes one line and exit
    status 2; any other error one line and exit status 1 (the traceback with ``-debug``)."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001
        user_facing = isinstance(err, (SettingsError, MissingFileError)) or getattr(err, "one_line", False)
        if DEBUG:
            raise
        if user_facing:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        text = " ".join(str(err).split())
        print(f"error: {type(err).__name__}: {text[:300]} (run again with -debug for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None


def run_script(main: Callable[[Settings], Any], description: str) -> Any:
    """The body of every script's ``__main__``: settings from the command line, then ``main``,
    with bad settings and missing inputs reported in one line (exit status 2)."""
    settings = script_settings(description)
    return settings_or_exit(lambda: main(settings))


def run_stage(module, paths: str | list[str], settings: Settings, log: Callable[[str], Any] = print) -> None:
    """A study's prerequisite: run ``module.main(settings)`` unless every file in ``paths`` (what it
    writes for these settings) already exists, in which case those files are reused (logged)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    name = module.__name__.split(".")[-1]
    if all(os.path.isfile(p) for p in paths):
        log(f"reuse {name}'s {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""))
    else:
        log(f"run {name}: {next(p for p in paths if not os.path.isfile(p))} is missing")
        with quiet_console():
            module.main(settings)


def solver_error(block: str, err: Exception) -> "SettingsError":
    """An influence-engine error (its words are the solver settings' names) as a one-line settings
    error naming the block they live in, e.g. "mnist.method2: LiSSA diverged ... raise the scale"."""
    return SettingsError(f"{block}: {err}")


def data_path(path: str) -> str:
    """A data folder setting (mnist.data_dir): repo-relative; the default "data" goes to
    $TOOLKIT_DATA_DIR when that is set (the tests set it to a temporary folder, so that they never
    write into the clone's data/)."""
    override = os.environ.get("TOOLKIT_DATA_DIR")
    if override and os.path.normpath(path) == "data":
        return override
    return resolve_path(path)


def output_path(settings: Settings, subdir: str, *parts: str) -> str:
    """A path under ``output_dir/subdir`` (created); results never go into the source tree."""
    folder = os.path.join(resolve_path(settings.output_dir), subdir, *parts[:-1])
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, parts[-1])


def output_folder(settings: Settings, subdir: str, *parts: str) -> str:
    """A folder under ``output_dir/subdir`` (created)."""
    folder = os.path.join(resolve_path(settings.output_dir), subdir, *parts)
    os.makedirs(folder, exist_ok=True)
    return folder


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def apply_threads(settings: Settings) -> int:
    """Set torch's CPU thread count from the ``threads`` setting and return it. The default 1
    makes seeded CPU results independent of the machine's core count (reductions split across
    threads sum in another order); 0 keeps torch's default (all cores: faster influence sweeps,
    results that can differ in the last bits between machines)."""
    wanted = settings.threads
    if wanted and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def select_device(use_gpu: bool, logger: logging.Logger | None = None) -> torch.device:
    """CUDA when ``use_gpu`` is true and a GPU exists, else CPU; the choice is logged."""
    has_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu and has_cuda else "cpu")
    if logger is not None:
        gpu = torch.cuda.get_device_name(0) if has_cuda else "none"
        logger.info(f"device: {device} (use_gpu={use_gpu}, CUDA available: {has_cuda}, GPU: {gpu})",
                    extra={"header": True})
        if use_gpu and not has_cuda:
            logger.warning("use_gpu is true but no CUDA GPU is visible: running on the CPU")
    return device


def distributed_start(use_gpu: bool) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE set) join the group: gloo on CPU, NCCL on GPU;
    run alone, (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if use_gpu and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def distributed_barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def distributed_end() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def partition(jobs: list, rank: int, world: int) -> list:
    """This rank's disjoint share of the jobs (round robin): every job goes to exactly one rank."""
    return jobs[rank::world]


def pending_share(jobs: list[dict], rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """(the jobs whose output file ``job["path"]`` does not exist yet, this rank's share of them).
    Every rank lists the pending jobs before any rank writes one (a barrier under torchrun), so all
    ranks partition the same list: a resumed study redoes exactly the missing jobs, once."""
    pending = [job for job in jobs if not os.path.isfile(job["path"])]
    distributed_barrier()
    return pending, partition(pending, rank, world)


_QUIET = [0]  # > 0 while a driver runs a stage: its console shows warnings only (its log file has everything)


def detail_log(logger: logging.Logger) -> Callable[[str], None]:
    """A log function for lines the log file keeps and the console does not (a study's stages)."""
    return lambda message: logger.info(message, extra=DETAIL)


class quiet_console:
    """``with opt.quiet_console():`` the scripts run inside (a driver's stages) print warnings and
    progress bars only; their log files keep every line."""

    def __enter__(self):
        _QUIET[0] += 1

    def __exit__(self, *exc):
        _QUIET[0] -= 1
_ANNOUNCED: set = set()  # (settings file, profile, output, threads) already shown on this process's console


def start_script(settings: Settings, name: str, cfg, seed: bool = True) -> tuple[logging.Logger, torch.device]:
    """The opening every script shares: its logger (:func:`make_logger`), its device from the
    network's typed block's ``use_gpu`` (logged), and, with ``seed``, python, numpy and torch seeded
    from its ``seed``."""
    logger = make_logger(settings, name)
    device = select_device(cfg.use_gpu, logger)
    if seed:
        seed_everything(cfg.seed)
    return logger, device


def make_logger(settings: Settings, name: str) -> logging.Logger:
    """A logger to the console and to ``output_dir/logs/{name}_{time}.log``; logs the settings. The
    header lines (settings, profile, device) reach the console once per process and settings: a
    driver running several stages shows them once, every log file has them all."""
    if os.environ.get("RANK") not in (None, "0"):  # torchrun: one log per rank
        name = f"{name}_rank{os.environ['RANK']}"
    logger = logging.getLogger(f"toolkit.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # Spyder re-runs in one interpreter: no doubled lines
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s - %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    if _QUIET[0]:
        console.setLevel(logging.WARNING)
    # the full settings (a long JSON line) go to the log file only: the console stays readable
    console.addFilter(lambda record: not record.getMessage().startswith("settings: "))
    console.addFilter(lambda record: not getattr(record, "detail", False))
    found = settings.source
    announced = (found.settings_file, settings.profile, resolve_path(settings.output_dir), settings.threads,
                 tuple(found.profile_changed), tuple(found.recipe_kept))
    if announced in _ANNOUNCED:
        console.addFilter(lambda record: not getattr(record, "header", False))
    _ANNOUNCED.add(announced)
    logger.addHandler(console)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = output_path(settings, "logs", f"{name}_{stamp}_{os.getpid()}.log")
    counter = 1
    while os.path.exists(log_file):  # two runs in one second in one process: never share a log
        counter += 1
        log_file = output_path(settings, "logs", f"{name}_{stamp}_{os.getpid()}_{counter}.log")
    logger.log_file = log_file  # type: ignore[attr-defined]
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s - %(message)s"))
    logger.addHandler(file_handler)
    threads = apply_threads(settings)
    logger.info(f"{name}: settings {found.settings_file} (profile {settings.profile}), "
                f"{threads} torch thread{'s' if threads > 1 else ''}, output {resolve_path(settings.output_dir)}, "
                f"log file {log_file}", extra={"header": True})
    changed = found.profile_changed
    if changed:
        shown_keys = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        logger.info(f"profile {settings.profile} set {shown_keys}", extra={"header": True})
    if found.recipe_changed or found.recipe_kept:
        logger.info(f"recipes mnist {settings.mnist.recipe}, ffdnet {settings.ffdnet.recipe} set "
                    f"{', '.join(found.recipe_changed) or 'nothing'}"
                    + (f"; kept your {'; '.join(found.recipe_kept)}" if found.recipe_kept else ""),
                    extra={"header": True})
    for line in found.renamed:
        logger.info(line, extra={"header": True})
    if found.defaults_taken:
        taken = found.defaults_taken
        logger.info(f"{found.settings_file} leaves out {', '.join(taken[:6])}"
                    + (f" and {len(taken) - 6} more" if len(taken) > 6 else "") + ": their defaults are used "
                    "(python3 <script> -h lists them)", extra={"header": True})
    logger.info("settings: " + json.dumps({**as_dict(settings), "settings_file": found.settings_file,
                                           "profile_changed": changed}, sort_keys=True))
    return logger


