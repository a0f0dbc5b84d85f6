"""The README's commands, run as shown (from a fresh folder holding only the files they name).

Every ``rnn-sparsify`` line of the README's ``bash`` blocks is run through the installed console
script; GPU-only commands (``bench``) are checked for parsing only. The sample output, the
exit-code table and the command list must match the code.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest

from rnn_sparsify.cli import build_parser
from rnn_sparsify.target import EXIT_CODES
from tests.test_cli_contract import BUILD, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
GPU_ONLY = {"bench"}


def _blocks(lang: str) -> list[str]:
    """The README's fenced blocks of language ``lang`` ("" for plain blocks)."""
    blocks, cur, cur_lang = [], None, None
    for line in README.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, cur_lang = [], line[3:].strip()
            else:
                if cur_lang == lang:
                    blocks.append("\n".join(cur) + "\n")
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def _commands(text: str, prompt: str = "") -> list[list[str]]:
    """Shell lines (continuations joined, comments dropped) that start with rnn-sparsify."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if prompt:
            if not line.startswith(prompt):
                continue
            line = line[len(prompt):]
        argv = shlex.split(line, comments=True)
        if argv and argv[0] == "rnn-sparsify":
            out.append(argv[1:])
    return out


COMMANDS = [argv for block in _blocks("bash") for argv in _commands(block)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A folder with what a fresh clone has for these commands (the examples' code, the test models)."""
    d = tmp_path_factory.mktemp("clone")
    for sub in ("examples", os.path.join("tests", "models")):
        os.makedirs(d / sub)
        for name in os.listdir(os.path.join(ROOT, sub)):
            if name.endswith(".py"):
                shutil.copy(os.path.join(ROOT, sub, name), d / sub / name)
    return d


def test_readme_names_every_command():
    assert COMMANDS, "no rnn-sparsify command found in the README"
    used = {argv[0] for argv in COMMANDS}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert used == set(sub.choices), (used, set(sub.choices))


def test_readme_commands_run_as_shown(fresh):
    for argv in COMMANDS:
        if argv[0] in GPU_ONLY:
            args = build_parser().parse_args(argv)  # raises SystemExit on a bad line
            assert args.command == argv[0]
            continue
        r = run_cli(argv, fresh)
        expected = BUILD if argv[0] == "compile" else 0
        assert r.returncode == expected, (argv, r.returncode, r.stderr)
        if "-o" in argv and expected == 0:
            assert (fresh / argv[argv.index("-o") + 1]).exists(), argv
    assert '"lstms"' in (fresh / "reports" / "lm.json").read_text()
    assert (fresh / "reports" / "cell.dot").read_text().startswith("digraph")


def test_readme_sample_output_matches(fresh):
    block = next(b for b in _blocks("") if "$ rnn-sparsify" in b)
    (argv,) = _commands(block, prompt="$ ")
    r = run_cli(argv, fresh)
    assert r.returncode == 0, r.stderr
    shown = [line for line in block.splitlines()[2:] if line and not line.startswith("...")]
    got = r.stdout.splitlines()
    for line in shown:
        if line.startswith("GEMM FLOPs"):
            assert any(g.startswith(line.split(", ...")[0]) for g in got), line
        else:
            assert line in got, (line, got)


def test_exit_code_table_matches_the_code():
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", README, flags=re.M)
    table = {int(code): text.replace("`", "") for code, text in rows}
    assert table == EXIT_CODES
