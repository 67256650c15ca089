"""Every command the documentation shows must run as written: README.md, docs/*.md and each
script's module docstring. Each documented command is parsed by its script's own argument parser
(a renamed flag, a dropped choice or a bad value fails here), and the README's quick start runs
end to end in a fast form (the same commands with small data appended: argparse keeps the last)."""
import ast
import glob
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# appended to the quick start's commands: small synthetic data, a few seconds each
FAST = {"pretrain.py": ["--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
                        "--pca-images", "64", "--num-workers", "0"],
        "linprobe.py": ["--synthetic-size", "64", "--synthetic-val-size", "64",
                        "--num-workers", "0"]}


def documents():
    """(name, text) of every document a user reads commands from."""
    names = ["README.md"] + sorted(os.path.relpath(f, ROOT)
                                   for f in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for name in names:
        with open(os.path.join(ROOT, name)) as f:
            yield name, f.read()
    scripts = sorted(glob.glob(os.path.join(ROOT, "*.py")))
    scripts += sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))
    for path in scripts:
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if doc:
            yield os.path.relpath(path, ROOT), doc


def command_lines(text):
    """Shell command lines of a text: lines that start with python or torchrun (continuation
    backslashes joined), and inline `python ...` spans of prose."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if re.match(r"^\s*(torchrun|python3?)\s", lines[i]):
            command = lines[i].strip()
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            yield command
        i += 1
    for match in re.finditer(r"`((?:python3?|torchrun) [^`]+)`", text):
        yield " ".join(match.group(1).split())


def script_and_argv(command):
    """('pretrain.py', [flags...]) of a documented command, or None when it is not one to check:
    no repository script in it, or written as a pattern ('...', '[--a | --b]', shell loops)."""
    words = shlex.split(command, comments=True)
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    if not scripts or any(w == "..." or w.startswith("[") or "$" in w for w in words):
        return None
    script = words[scripts[0]]
    if not os.path.exists(os.path.join(ROOT, script)) or script == "tools/bench_vit_step.py":
        return None
    argv = words[scripts[0] + 1:]
    # the shell's part of the line (a redirection, a pipe, a second command) is not the script's
    operators = [i for i, w in enumerate(argv) if w in (">", ">>", "|", "&&", ";", "2>&1")]
    if operators:
        argv = argv[:operators[0]]
    if script == "tools/pack_data.py" and len(argv) < 2:
        # prose naming the subcommand (`python tools/pack_data.py pack`), not a command line
        return None
    return script, argv


def documented_commands():
    found = []
    for name, text in documents():
        for command in command_lines(text):
            parsed = script_and_argv(command)
            if parsed:
                found.append(pytest.param(*parsed, id=f"{name}: {command[:60]}"))
    return found


def parser_of(script):
    name = os.path.splitext(os.path.basename(script))[0]     # tools/ is on sys.path (conftest)
    return importlib.import_module(name).get_args_parser()


def test_the_documents_show_commands_of_every_script():
    scripts = {param.values[0] for param in documented_commands()}
    expected = {"pretrain.py", "linprobe.py", "tokenizer_pca.py", "distill.py", "export_timm.py",
                "tools/pack_data.py", "tools/gpu_check.py"}
    assert expected <= scripts, expected - scripts


@pytest.mark.parametrize("script,argv", documented_commands())
def test_every_documented_command_parses(script, argv):
    # a SystemExit here is the script's own "error: ..." line for a flag the docs got wrong
    parser_of(script).parse_args(argv)


def readme_quick_start():
    """The README's first code block: the install line, then the quick-start commands."""
    with open(os.path.join(ROOT, "README.md")) as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    return [script_and_argv(c) for c in command_lines(block) if script_and_argv(c)]


def test_the_readme_quick_start_runs_in_a_fast_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = readme_quick_start()
    assert [script for script, _ in steps] == ["pretrain.py", "linprobe.py"]
    results = []
    for script, argv in steps:
        module = importlib.import_module(script[:-3])
        results.append(module.main(module.get_args_parser().parse_args(argv + FAST[script])))
    trained, probed = results
    assert trained["steps"] == 4 and os.path.exists(trained["checkpoint"])
    # the probe read the checkpoint the first command wrote, and reports a top-1
    assert 0 <= probed["top1"] <= 100
