"""A small reader of the extension's CMake files, and the install tree they describe.

The static checks compare the CMake lists with the files on disk; the Slicer-like tests run
the modules from a copy of exactly what the extension build installs, laid out by the same
lists (``slicerMacroBuildScriptedModule`` SCRIPTS/RESOURCES, and the ``file(GLOB_RECURSE)`` +
``ctkMacroCompilePythonScript`` that install the ``deepimaging`` library), so a file missing
from them is missing in the test too.
"""

import fnmatch
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_COMMAND_START = re.compile(r"^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\(", re.M)
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_FILE_OPTIONS = {"RELATIVE", "CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS", "LIST_DIRECTORIES"}


def module_folders():
    """Top-level folders that are Slicer modules: a CMakeLists.txt and ``<Folder>.py``."""
    return sorted(p for p in REPO.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and (p / "CMakeLists.txt").is_file() and (p / f"{p.name}.py").is_file())


def cmake_commands(path, predefined=None):
    """``[(command, [arguments])]`` of a CMakeLists.txt, with ``${VAR}`` expanded.

    Enough of CMake's syntax for extension files: comments, quoted arguments (kept whole, may
    hold parentheses), unquoted arguments split on whitespace, nested parentheses; ``set()``
    and ``file(GLOB|GLOB_RECURSE ...)`` define variables (``predefined`` seeds others, e.g.
    ``PROJECT_SOURCE_DIR``; unknown variables expand to nothing, as in CMake).
    """
    text = Path(path).read_text()
    variables = {name: list(value) for name, value in (predefined or {}).items()}
    commands, index = [], 0
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
        name = match.group(1).lower()
        if name == "set" and arguments:
            variables[arguments[0]] = arguments[1:]
        elif name == "file" and len(arguments) > 1 and arguments[0] in ("GLOB", "GLOB_RECURSE"):
            variables[arguments[1]] = _glob(arguments)
        commands.append((match.group(1), arguments))


def _glob(arguments):
    """Evaluate ``file(GLOB[_RECURSE] VAR [RELATIVE dir] [options] patterns...)`` on the disk."""
    recursive, rest = arguments[0] == "GLOB_RECURSE", arguments[2:]
    relative, patterns, skip = None, [], False
    for position, argument in enumerate(rest):
        if skip:
            skip = False
            continue
        if argument == "RELATIVE":
            relative, skip = Path(rest[position + 1]), True
        elif argument not in _FILE_OPTIONS:
            patterns.append(argument)
    found = set()
    for pattern in patterns:
        folder, name = Path(pattern).parent, Path(pattern).name
        candidates = folder.rglob("*") if recursive else folder.glob("*")
        found |= {p for p in candidates if p.is_file() and fnmatch.fnmatchcase(p.name, name)
                  and "__pycache__" not in p.parts}
    return sorted(str(p.relative_to(relative) if relative else p) for p in found)


def _in_comment(text, position):
    line_start = text.rfind("\n", 0, position) + 1
    return "#" in re.sub(r'"[^"]*"', "", text[line_start:position])


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


def cmake_variables(path, predefined=None):
    """The last value ``set()`` gave each variable (a list of strings)."""
    return {args[0]: args[1:] for name, args in cmake_commands(path, predefined) if name.lower() == "set" and args}


def _keyword_lists(arguments, keywords):
    """``{KEYWORD: [values]}`` of a CMake macro call with keyword arguments."""
    lists, current = {}, None
    # A quoted "${LIST}" arrives as one argument; a macro's argument parsing splits it on ";".
    for argument in (part for argument in arguments for part in argument.split(";") if part):
        if argument in keywords:
            current = argument
            lists.setdefault(current, [])
        elif current is not None:
            lists[current].append(argument)
    return lists


_BUILD_KEYWORDS = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR"}
_COMPILE_KEYWORDS = {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
                     "NO_INSTALL_SUBDIR"}


def installed_files():
    """``{relative path in qt-scripted-modules: source file}`` of everything the extension installs.

    Scripted modules install their SCRIPTS and RESOURCES relative to the module folder;
    ``ctkMacroCompilePythonScript`` installs relative to its SOURCE_DIR (with NO_INSTALL_SUBDIR,
    into the same qt-scripted-modules folder Slicer puts on ``sys.path``).
    """
    files = {}
    for folder in module_folders():
        predefined = {"PROJECT_SOURCE_DIR": [str(REPO)], "CMAKE_CURRENT_SOURCE_DIR": [str(folder)]}
        for name, arguments in cmake_commands(folder / "CMakeLists.txt", predefined):
            if name == "slicerMacroBuildScriptedModule":
                lists = _keyword_lists(arguments, _BUILD_KEYWORDS)
                for relative in lists.get("SCRIPTS", []) + lists.get("RESOURCES", []):
                    files[relative] = folder / relative
            elif name == "ctkMacroCompilePythonScript":
                lists = _keyword_lists(arguments, _COMPILE_KEYWORDS)
                source = Path(lists["SOURCE_DIR"][0])
                for relative in lists.get("SCRIPTS", []) + lists.get("RESOURCES", []):
                    files[relative] = source / relative
    return files


def build_install_tree(destination):
    """Copy what the extension installs into ``destination`` (a qt-scripted-modules folder)."""
    destination = Path(destination)
    for relative, source in installed_files().items():
        if not source.is_file():
            raise FileNotFoundError(f"CMake installs {relative}, which does not exist at {source}")
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination
