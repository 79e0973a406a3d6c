"""Shared helpers of the static checks: module discovery and a small CMake reader.

The Widget, the .ui files and the CMake lists can't run without the Slicer application, so
they are checked by reading them.  Modules are discovered, not listed: any top-level folder
holding a CMakeLists.txt and ``<Folder>.py`` is a module folder, so new modules are covered
without touching these tests.
"""

import re
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_COMMAND_START = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\(", re.M)
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def module_folders():
    return sorted(p for p in REPO.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and (p / "CMakeLists.txt").is_file() and (p / f"{p.name}.py").is_file())


def module_scripts():
    """Every top-level ``.py`` of every module folder (a folder may hold several modules)."""
    return sorted(script for folder in module_folders() for script in folder.glob("*.py"))


def cmake_commands(path):
    """``[(command, [arguments])]`` of a CMakeLists.txt, with ``${VAR}`` from earlier ``set()`` expanded.

    Enough of CMake's syntax for extension files: comments, quoted arguments (kept whole, may
    hold parentheses), unquoted arguments split on whitespace, nested parentheses.
    """
    text = Path(path).read_text()
    variables, commands, index = {}, [], 0
    while True:
        match = _COMMAND_START.search(text, index)
        if not match:
            return commands
        if _in_comment(text, match.start()):
            index = text.index("\n", match.start()) + 1 if "\n" in text[match.start():] else len(text)
            continue
        tokens, index = _arguments(text, match.end())
        arguments = []
        for quoted, value in tokens:
            expanded = _VARIABLE.sub(lambda m: ";".join(variables.get(m.group(1), [])), value)
            if quoted:
                arguments.append(expanded)
            else:
                arguments.extend(part for part in expanded.split(";") if part)
        if match.group(1).lower() == "set" and arguments:
            variables[arguments[0]] = arguments[1:]
        commands.append((match.group(1), arguments))


def _in_comment(text, position):
    line_start = text.rfind("\n", 0, position) + 1
    return "#" in _strip_strings(text[line_start:position])


def _strip_strings(fragment):
    return re.sub(r'"[^"]*"', "", fragment)


def _arguments(text, index):
    """Tokens ``(quoted, value)`` from just after ``(`` to the matching ``)``; returns the end index."""
    tokens, depth, current = [], 0, ""
    while index < len(text):
        char = text[index]
        if char == '"':
            end = text.index('"', index + 1)
            tokens.append((True, text[index + 1:end]))
            index = end + 1
            continue
        if char == "#":
            index = text.index("\n", index) if "\n" in text[index:] else len(text)
            continue
        if char in " \t\r\n" or (char == ")" and depth == 0):
            if current:
                tokens.append((False, current))
                current = ""
            if char == ")":
                return tokens, index + 1
        else:
            depth += char == "("
            depth -= char == ")"
            current += char
        index += 1
    raise ValueError("unbalanced parentheses in CMake file")


def cmake_variables(path):
    """The last value ``set()`` gave each variable (a list of strings)."""
    return {args[0]: args[1:] for name, args in cmake_commands(path) if name.lower() == "set" and args}


def pytest_generate_tests(metafunc):
    if "module_dir" in metafunc.fixturenames:
        folders = module_folders()
        metafunc.parametrize("module_dir", folders, ids=[f.name for f in folders])
    if "module_script" in metafunc.fixturenames:
        scripts = module_scripts()
        metafunc.parametrize("module_script", scripts, ids=[s.name for s in scripts])


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def cmake():
    """The CMake reader: ``cmake.commands(path)`` and ``cmake.variables(path)``."""
    return types.SimpleNamespace(commands=cmake_commands, variables=cmake_variables)


@pytest.fixture
def all_module_folders():
    return module_folders()
