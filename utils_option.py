"""Settings, paths, seeding, device choice, logging and result files, shared by every script: the
façade over the settings floor (``options/``), one module per job:

| job | module |
|---|---|
| the typed blocks, each setting's default and help | options.blocks, options.method2 (Method 2, from the registry) |
| one check per kind of value | options.check |
| loading, the settings' history, variants (``with_values``), ``as_dict`` | options.loading |
| the command line, paths, seeding, the device, torchrun, logging | options.run |
| result files, inputs with one-line errors, progress bars, timers | options.results |
| ``Implementation.json`` written from the blocks' help | options.default_file |

Every script's ``__main__`` is :func:`run_script`: ``main`` gets one typed ``Settings``.
"""
from options.base import (DEFAULT_SETTINGS, REPO_ROOT, MissingFileError, SettingsError,  # noqa: F401
                          UnreadableFileError, resolve_path)
from options.blocks import Loaded, Settings, defaults, help_lines, schema, typed  # noqa: F401
from options.recipe import PRESETS, Recipe, preset_values, recipe_table  # noqa: F401
from options.loading import (RENAMED_KEYS, RETIRED_KEYS, RETYPED_KEYS, SCHEMA, STRUCTURAL_KEYS,  # noqa: F401
                             _lookup, as_dict, check_known_keys, check_written, deep_merge, load_settings,
                             load_settings_dict, parse_assignment, rename_keys, settings_layers, strip_comments,
                             validate, value_at, with_values)
from options.method2 import lds_methods, method2_class, offered_solvers, solver_file_part, solver_run  # noqa: F401
from options.results import (DETAIL, Timer, atomic_write, float_matrix_json, is_interactive, key_differences,  # noqa: F401
                             load_torch,
                             markdown_table, peak_rss_mb, progress, read_json, require_file, require_shape,
                             save_figure, save_torch, write_csv, write_json, write_json_with_matrices, write_text)
from options.run import (DEBUG, apply_threads, data_path, detail_log, distributed_barrier,  # noqa: F401
                         distributed_end, distributed_start, make_logger, output_folder, output_path, partition,
                         pending_share, quiet_console, run_script, run_stage, script_settings, seed_everything,
                         select_device, settings_or_exit, solver_error, start_script)
