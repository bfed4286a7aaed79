"""The README's quick-start test command is the one CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text().split("# --- the README's test command ---", 1)[1]
    assert ci.strip().splitlines()[0] == commands[1]
