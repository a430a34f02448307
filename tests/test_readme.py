"""The README's two commands are the contract, and .ci/run runs exactly them."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {name} -->\n```bash\n(.*?)\n```\n<!-- /{name} -->", text, re.S)
    assert block, f"README.md has no <!-- {name} --> block"
    lines = block.group(1).splitlines()
    assert len(lines) == 1, f"the {name} must be one copy-paste line"
    return lines[0]


def test_the_commands_set_up_from_scratch_with_pinned_versions():
    for name in ("build-command", "test-command"):
        cmd = readme_command(name)
        assert cmd.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -c constraints.txt")
    assert readme_command("build-command").endswith("jupyter-book build . -W -n --keep-going")
    assert "pytest -n 2 --dist loadfile" in readme_command("test-command")


def test_ci_extracts_the_readme_commands_verbatim():
    script = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in script and "build-command" in script
    # run the script's own extraction function and compare with the README
    for name in ("test-command", "build-command"):
        out = subprocess.run(
            ["bash", "-c", f'source <(sed -n "/^readme_command()/,/^}}/p" .ci/run); readme_command {name}'],
            cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        assert out == readme_command(name)


def test_constraints_pin_the_cpu_torch_and_jupyter_book_1():
    pins = (ROOT / "constraints.txt").read_text()
    assert "\ntorch==2.13.0\n" in pins
    assert re.search(r"\njupyter-book==1\.", pins)
    reqs = (ROOT / "requirements.txt").read_text()
    assert "jupyter-book>=1.0.4,<2" in reqs and "-e ." in reqs
