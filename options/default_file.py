"""``Implementation.json`` written from the typed blocks: every key in the blocks' order, each with its
help text as the comment, so the help is written once (options/blocks.py, options/method2.py and the
solvers' own settings). The values are the file's own (a user's edits are kept), or the defaults for
keys it lacks; the ``profiles`` section is kept as the file has it.

    python3 -m options.default_file          # rewrite Implementation.json (values kept, comments and keys from the blocks)
    python3 -m options.default_file --check  # exit 1 when the file differs (the test suite runs this check)
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import fields

from options.blocks import Settings, block_class

HEADER = ("// Settings for the whole toolkit. Edit between runs; every script also takes -opt PATH (another\n"
          "// file) and -profile NAME. \"//\" starts a comment. Paths are relative to the repository root.\n"
          "// The comments are the settings' help (python3 -m options.default_file rewrites them; -h shows them).\n")
COMMENT_COLUMN = 36


def _value_text(value) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _commented(text: str, comment: str) -> str:
    return (text.ljust(COMMENT_COLUMN) if len(text) < COMMENT_COLUMN else text + "  ") + f"// {comment}"


def _lines(cls: type, values: dict, indent: int) -> list[str]:
    pad = " " * indent
    items = [f for f in fields(cls) if not f.metadata.get("run")]
    out = []
    for position, f in enumerate(items):
        comma = "," if position < len(items) - 1 else ""
        if f.metadata.get("block"):
            inner = block_class(f)
            doc = (inner.__doc__ or "").strip().splitlines()[0]
            out.append(_commented(f'{pad}"{f.name}": {{', doc))
            out += _lines(inner, values.get(f.name, {}), indent + 2)
            out.append(f"{pad}}}{comma}")
        else:
            text = f'{pad}"{f.name}": {_value_text(values[f.name])}{comma}'
            out.append(_commented(text, f.metadata['help']))
    return out


def render(current_text: str) -> str:
    """The file's text from the blocks, with ``current_text``'s values and profiles section."""
    import utils_option as opt
    raw = json.loads(opt.strip_comments(current_text))
    values = opt.deep_merge(opt.defaults(), {k: v for k, v in raw.items() if k != "profiles"})
    body = _lines(Settings, values, 2)
    profiles_at = current_text.index('\n  "profiles"')
    return HEADER + "{\n" + "\n".join(body[:-1] + [body[-1] + ","]) + "\n" + current_text[profiles_at + 1:]


def main() -> int:
    import utils_option as opt
    with open(opt.DEFAULT_SETTINGS, encoding="utf-8") as f:
        current = f.read()
    wanted = render(current)
    if "--check" in sys.argv:
        if wanted != current:
            print(f"{opt.DEFAULT_SETTINGS} differs from the blocks' keys and help: run python3 -m options.default_file")
            return 1
        return 0
    opt.write_text(opt.DEFAULT_SETTINGS, wanted)
    print(f"wrote {opt.DEFAULT_SETTINGS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
