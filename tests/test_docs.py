"""The READMEs' commands run: every ``zoo …`` line of a ```bash block, with tiny settings.

For each README (the top-level one and every task's), its commands run in order, in the README's
own scratch folder whose ``configs/`` is the repository's, so ``zoo test --ckpt_path last`` after
a ``zoo fit`` of the same config reads that fit's checkpoint. What makes a command tiny:

- fit/validate/test/predict get the task's ``TINY`` overrides (``tests/docs_examples/<task>.py``);
- ``zoo compare`` gets ``TINY`` too and ``--seeds 1``;
- a user-data path is written ``data/<name>`` in a README and the task's ``write(name, dest)``
  creates that dataset, in the layout the README describes, before the command runs; a task whose
  configs take different keys adds ``tiny_for(config_name) -> list[str]``;
- a command that trains data-parallel (``--trainer.strategy ddp``) runs in its own process, as the
  launcher re-executes it; every other command runs in-process through ``zoo.cli.main``.

The structure of the task READMEs (one set of section headings for all six) is checked here too.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
READMES = [REPO / "README.md", *sorted((REPO / "tasks").glob("*/README.md"))]
TASK_HEADINGS = ["What the paper does", "Quick start", "Plug in your data", "Configs", "Results",
                 "Faithfulness to the authors' code", "Known limits"]
LIGHTNING = ("fit", "validate", "test", "predict")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands(path: Path) -> list[list[str]]:
    """Every ``zoo`` command of the README's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in bash_blocks(path.read_text()):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line.startswith("zoo "):
                continue
            while line.endswith("\\") and i < len(lines):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def task_of(args: list[str]) -> str | None:
    for a in args:
        m = re.match(r"(?:--config=)?configs/([^/]+)/[^/]+\.ya?ml$", a)
        if m:
            return m.group(1)
    return None


def config_stem(args: list[str]) -> str:
    """The name of the command's (first) config file: configs/rl/pmoe_sac.yaml -> pmoe_sac."""
    for a in args:
        m = re.match(r"(?:--config=)?configs/[^/]+/([^/]+)\.ya?ml$", a)
        if m:
            return m.group(1)
    raise AssertionError(f"no config in {args}")


def set_option(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1] = value
            return out
        if a.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return out + [name, value]


def docs_example(task: str):
    """tests/docs_examples/<task>.py: its write(name, dest) and TINY."""
    path = REPO / "tests" / "docs_examples" / f"{task}.py"
    assert path.is_file(), f"no {path.relative_to(REPO)} for the README commands of task {task!r}"
    spec = importlib.util.spec_from_file_location(f"docs_examples_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(args: list[str], scratch: Path) -> list[str]:
    """The command with the task's tiny overrides, its data written under scratch/data."""
    for a in args:
        if "<" in a or "$" in a or a.startswith("~") or a.startswith("/"):
            raise AssertionError(f"README command argument {a!r}: write user data as data/<name> so the docs "
                                 f"test can create it (tests/docs_examples/<task>.py)")
    task = task_of(args)
    sub = args[0]
    if task is None or sub in ("list", "flops"):
        return list(args)
    examples = docs_example(task)
    for a in args:
        if a.startswith("data/"):
            name = a[len("data/"):].rstrip("/")
            dest = scratch / "data" / name
            if not dest.exists():
                examples.write(name, dest)
    extra = list(examples.TINY)
    if hasattr(examples, "tiny_for"):  # overrides that only some configs of the task accept
        extra += examples.tiny_for(config_stem(args))
    if sub in LIGHTNING:
        return [*args, *extra]
    if sub == "compare":
        return [*set_option(args, "--seeds", "1"), *extra]
    return list(args)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_commands_run(readme, tmp_path, monkeypatch, restore_torch_globals):
    from zoo.cli import main

    commands = readme_commands(readme)
    assert commands, f"{readme.relative_to(REPO)} shows no zoo command in a ```bash block"
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for args in commands:
        run = tiny(args, tmp_path)
        shown = "zoo " + " ".join(args)
        if "ddp" in run:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = subprocess.run([sys.executable, "-m", "zoo.cli", *run], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{shown}\n{proc.stderr[-3000:]}"
        else:
            assert main(run) == 0, f"{readme.relative_to(REPO)}: {shown} failed (tiny form: {run})"


@pytest.mark.parametrize("readme", READMES[1:], ids=lambda p: p.parent.name)
def test_task_readmes_share_one_structure(readme):
    headings = re.findall(r"^## (.+?)\s*$", readme.read_text(), flags=re.M)
    assert headings == TASK_HEADINGS, f"{readme.relative_to(REPO)} has sections {headings}"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readmes_speak_to_users_not_of_their_history(readme):
    text = readme.read_text()
    for pattern in (r"\bsessions?\b", r"\brounds? \d", r"\bwe tried\b", r"\btried and (not|dropped)"):
        hit = re.search(pattern, text, flags=re.I)
        assert hit is None, f"{readme.relative_to(REPO)}: {hit.group(0)!r}"


def test_docs_parser_joins_continuations_and_cuts_comments(tmp_path):
    md = tmp_path / "README.md"
    md.write_text("text\n```bash\nzoo fit --config configs/x/a.yaml   # train\nzoo compare configs/x/a.yaml \\\n"
                  "    configs/x/b.yaml --seeds 3\npython other.py\n```\n```python\nzoo fit --no\n```\n")
    assert readme_commands(md) == [["fit", "--config", "configs/x/a.yaml"],
                                   ["compare", "configs/x/a.yaml", "configs/x/b.yaml", "--seeds", "3"]]
    assert set_option(["compare", "a", "--seeds", "3"], "--seeds", "1") == ["compare", "a", "--seeds", "1"]
    with pytest.raises(AssertionError, match="data/<name>"):
        tiny(["fit", "--config", "configs/stock/moe.yaml", "--data.root", "~/panel.csv"], tmp_path)
