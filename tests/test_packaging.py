"""README, Makefile, CI, pyproject and environment.yml stay in step."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    proj = _pyproject()
    extras = proj["optional-dependencies"]
    wanted = {_name(r) for r in proj["dependencies"]}
    for extra in ("lab", "test", "triton", "compile", "gpu"):
        wanted |= {_name(r) for r in extras[extra]}
    text = (ROOT / "environment.yml").read_text()
    pip_lines = re.findall(r"^\s*(?:#\s*gpu extra:\s*)?-\s+([A-Za-z0-9_.\-]+[^\n]*)$", text.split("- pip:", 1)[1], re.M)
    named = {_name(line) for line in pip_lines if not line.startswith("-e")}
    assert named == wanted, f"environment.yml vs pyproject: missing {wanted - named}, extra {named - wanted}"
    # pins agree where both pin
    pins = {_name(r): r for extra in extras.values() for r in extra if "==" in r}
    for line in pip_lines:
        if "==" in line and _name(line) in pins:
            assert line.strip() == pins[_name(line)].split(";")[0].strip()


def test_readme_states_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup\n\t\$\(BIN\)/dsv4lab compare", makefile, re.M)
    assert re.search(r"^test: setup\n\t(DSV4LAB_HEADLESS=1 )?\$\(BIN\)/python -m pytest", makefile, re.M)
    assert "torch==2.13.0" in makefile  # an unpinned torch pulls a multi-GB CUDA build on CPU machines


def test_makefile_installs_the_extras_the_tests_need():
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS \?= (.+)$", makefile, re.M).group(1).split(",")
    assert {"lab", "test", "triton"} <= set(extras)
    assert set(extras) <= set(_pyproject()["optional-dependencies"])


def test_console_script_points_at_the_cli():
    assert _pyproject()["scripts"]["dsv4lab"] == "dsv4lab.cli:main"
