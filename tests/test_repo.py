"""The repository's promises to its readers: the README's commands are the ones CI runs."""

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[-1]
    assert "pytest" in command
    readme = (REPO / "README.md").read_text()
    top = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert command in top


def test_example_profiles_are_shipped_identically():
    for name in ("client.yaml", "server.yaml"):
        assert (REPO / "etc" / "tunvpn" / name).read_bytes() == \
            (REPO / "tunvpnd" / "examples" / name).read_bytes()
