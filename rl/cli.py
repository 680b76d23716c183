"""Shared command-line handling for `python -m rl.grpo | rl.dpo | rl.orpo | rl.kto | rl.sft` (and rl.generate).

    python -m rl.grpo --config examples/arithmetic.yaml [--section.key value ...] [--resume [PATH]] [--debug]
    python -m rl.grpo --help     # every config section and key, with its default and the schema's comment

User errors (TandemError) print one message and exit with code 2; `--debug` adds the traceback. The key list of
`--help` is read from rl/config.py itself (its dataclasses, their defaults, the comments beside and above each
field and the choices its `__post_init__` checks), so that it cannot drift from the schema.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import logging
import os
import sys
import textwrap
import tokenize
import traceback

from rl.errors import TandemError


# ------------------------------------------------------------------------------------ --help: the schema


def _schema_for(prog: str):
    from rl.config import GRPORunConfig, OfflineRunConfig

    return GRPORunConfig if prog == "rl.grpo" else OfflineRunConfig


def _show(value) -> str:
    """A default as it is written in YAML or on the command line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _field_notes(section_type) -> dict[str, str]:
    """{key: what the schema says of it}: the comment lines above the field, the comment beside it, and the
    choices its __post_init__ checks with _one_of (when the comments do not name them all already)."""
    source = textwrap.dedent(inspect.getsource(section_type))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    cls = ast.parse(source).body[0]
    choices = {}
    for call in ast.walk(cls):  # _one_of("section", "key", self.key, (choice, ...))
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_one_of" and len(call.args) == 4:
            try:
                choices[ast.literal_eval(call.args[1])] = ast.literal_eval(call.args[3])
            except ValueError:
                pass
    notes = {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        note = " ".join(above + [comments[node.lineno]] if node.lineno in comments else above)
        key = node.target.id
        if key in choices and not all(str(c) in note for c in choices[key]):
            note = (note + "; " if note else "") + "one of: " + " | ".join(map(str, choices[key]))
        notes[key] = note
    return notes


def config_help(schema) -> str:
    """Every section and key of `schema` with its default and what the schema says of it."""
    defaults = schema()
    out = ["config keys, each with its default (the schema is rl/config.py). In the YAML file as section: {key:",
           "value}; on the command line as --section.key value (a list as a,b; null for none):"]
    for section in dataclasses.fields(schema):
        values = getattr(defaults, section.name)
        doc = ast.get_docstring(ast.parse(textwrap.dedent(inspect.getsource(type(values)))).body[0])
        out.append(f"\n{section.name}:")
        if doc:
            out.extend(textwrap.wrap(" ".join(doc.split()), 114, initial_indent="  ", subsequent_indent="  "))
        notes = _field_notes(type(values))
        for key in dataclasses.fields(values):
            out.append(f"  --{section.name}.{key.name} {_show(getattr(values, key.name))}")
            if notes.get(key.name):
                out.extend(textwrap.wrap(notes[key.name], 112, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(out)


# ------------------------------------------------------------------------------------ running a command


def parse_args(prog: str, argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=prog, description="Train with Tandem. Any config key can be "
                                     "overridden as --section.key value (e.g. --train.max_steps 10).",
                                     epilog=config_help(_schema_for(prog)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see examples/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest checkpoint in train.output_dir, or from PATH")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def run_cli(prog: str, main, argv: list[str] | None = None, parse=parse_args) -> int:
    """Runs main(args, overrides); maps TandemError to exit code 2 with a single clear message. parse(prog, argv)
    -> (args with .debug, the --section.key overrides)."""
    args, overrides = parse(prog, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(args, overrides)
    except TandemError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def offline_main(objective: str):
    """main(args, overrides) for `python -m rl.<objective>` (DPO, ORPO, KTO, SFT): one schema, one trainer."""

    def main(args, overrides) -> None:
        from rl.config import OfflineRunConfig, load_config
        from rl.offline import OfflineTrainer

        cfg = load_config(args.config, overrides, schema=OfflineRunConfig)
        OfflineTrainer(cfg, objective, resume=args.resume).train()

    return main
