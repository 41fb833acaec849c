"""The README's two fresh-machine commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    return [line for line in lines[:20] if line.startswith("pip install")]


def test_readme_opens_with_the_main_job_and_the_test_command():
    commands = readme_commands()
    assert commands[0].endswith("linattn compare")
    assert "[test]" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]
