"""Reading code out of the documents a user reads: fenced blocks, inline code spans, and the shell commands in them.

One reader for every test that keeps a document true: ``tests/test_docs.py`` (README.md and docs/: Python blocks,
commands, links) and ``tests/test_benchmark_commands.py`` (every ``python -m benchmarks.NAME`` in the documents,
scripts and benchmark docstrings).

A command is read as a shell reads one line of it: backslash-continued lines are joined; it ends at a comment
(`` #``), a closing backtick, ``;``, ``&&``, ``||``, ``|`` or a closing parenthesis outside quotes; leading
``NAME=value`` words are its environment. Quoted words keep what is inside them (``"runs/main-$(date +%s)"`` is one
word).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("README.md", "docs/*.md")  # what a user reads: every Python block and command in them is checked


def pages() -> list[str]:
    """README.md and docs/*.md, relative to the repository root."""
    found = sorted({os.path.relpath(p, ROOT) for pattern in PAGES for p in glob.glob(os.path.join(ROOT, pattern))})
    assert "README.md" in found and len(found) > 5, found
    return found


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# Blocks and spans

_FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)  # indented too, as in a list item


class Block(NamedTuple):
    path: str
    line: int  # the document's line of the block's first line of code
    lang: str  # the fence's info string: "python", "bash", "" ...
    text: str  # the code, its indentation (a list item's) removed


def blocks(path: str, text: str) -> list[Block]:
    """The fenced blocks of a Markdown document, in order."""
    found = []
    for m in _FENCE.finditer(text):
        indent, code = m.group(1), m.group(3)
        if indent:
            code = "".join(line[len(indent):] if line.startswith(indent) else line.lstrip(" \t")
                           for line in code.splitlines(keepends=True))
        found.append(Block(path, text.count("\n", 0, m.start()) + 2, m.group(2).strip(), code))
    return found


def spans(text: str) -> list[tuple[int, str]]:
    """The inline code spans outside fenced blocks, with their line; a span that wraps onto the next line is one."""
    outside = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keeps the line numbers
    return [(outside.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " "))
            for m in re.finditer(r"`([^`]+)`", outside)]


def code_parts(path: str, text: str) -> list[str]:
    """Where a document keeps its commands: a Markdown file's fenced blocks and inline code spans, any other file's
    whole text."""
    if not path.endswith(".md"):
        return [text]
    return [b.text for b in blocks(path, text)] + [span for _, span in spans(text)]


# ----------------------------------------------------------------------------------------------
# Commands

# The programs whose commands the documents give; a command may start with NAME=value words.
PROGRAMS = r"slimtrain|python3? -m (?:slimtrain|benchmarks)[\w.]*|bash scripts/[\w.]+|deepspeed|torchrun"
_ENV = r"(?:[A-Z][A-Z0-9_]*=\S*[ \t]+)*"


def _start(programs: str) -> re.Pattern:
    return re.compile(rf"(?<![\w./=-])({_ENV})(?:{programs})(?=[\s`;)]|$)", re.M)


_ENDS = ("&&", "||", ";", "|", ")", "`")


def _command_text(rest: str) -> str:
    """``rest`` up to where the command ends (see the module docstring), continued lines joined."""
    out, quote, i = [], None, 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and rest[i + 1:i + 2] == "\n":  # a continued line
            out.append(" ")
            i += 2
            continue
        if ch == "\n":  # never inside a quoted word either: a document's command has none that wraps
            break
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif (ch == "#" and (not out or out[-1].isspace())) or rest.startswith(_ENDS, i):
            break
        out.append(ch)
        i += 1
    return "".join(out).strip()


class Command(NamedTuple):
    line: int  # the line of ``code`` where it starts (1-based)
    text: str  # as written, continued lines joined
    env: dict[str, str]  # its NAME=value words
    argv: list[str]  # the program first: ["slimtrain", "pretrain", ...], ["python", "-m", "benchmarks.zero", ...]


def commands(code: str, programs: str = PROGRAMS) -> list[Command]:
    """Every command of ``programs`` (a regular expression of their first words) in ``code``."""
    found, start, pos = [], _start(programs), 0
    while match := start.search(code, pos):
        text = _command_text(code[match.start():])
        pos = match.start() + max(len(text), 1)  # a program named in its arguments starts no command of its own
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise ValueError(f"cannot read the command {text!r}: {e}") from None
        env = {}
        while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        found.append(Command(code.count("\n", 0, match.start()) + 1, text, env, words))
    return found


def benchmark_commands(code: str) -> list[tuple[str, list[str]]]:
    """Each ``python -m benchmarks.NAME ARGS`` in ``code`` as (NAME, ARGS)."""
    return [(c.argv[2].split(".", 1)[1], c.argv[3:]) for c in commands(code, r"python3? -m benchmarks\.[a-z0-9_]+")]


class Documented(NamedTuple):
    path: str
    line: int
    text: str
    env: dict[str, str]
    argv: list[str]
    inline: bool  # from an inline code span, not a fenced block

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.text}`"


def _comment_start(line: str) -> int:
    """Where the shell comment of ``line`` starts (a ``#`` beginning a word, outside quotes), or its length."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def without_comments(code: str) -> str:
    """``code`` with each line's shell comment blanked out (a program named in a comment starts no command)."""
    return "\n".join(line[:_comment_start(line)].ljust(len(line)) for line in code.split("\n"))


def documented_commands(path: str, text: str) -> list[Documented]:
    """The commands of a Markdown document, from its fenced blocks and its inline code spans."""
    found = [Documented(path, b.line + c.line - 1, c.text, c.env, c.argv, False)
             for b in blocks(path, text) if b.lang != "python" for c in commands(without_comments(b.text))]
    found += [Documented(path, line, c.text, c.env, c.argv, True) for line, span in spans(text) for c in commands(span)]
    return sorted(found, key=lambda c: c.line)
