"""The project's own files agree with each other: the two distributions' versions and licence, the
CHANGELOG's form (Keep a Changelog) and its current section."""

from __future__ import annotations

import re
import tomllib

import dlrhub
import dlrhub_client
from tests.conftest import ROOT

SERVER = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CLIENT = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# Keep a Changelog's kinds of change.
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def test_both_distributions_have_one_version_and_the_server_pins_its_client() -> None:
    version = SERVER["version"]
    assert CLIENT["version"] == version
    assert dlrhub.__version__ == dlrhub_client.__version__ == version
    assert f"dlrhub-client=={version}" in SERVER["dependencies"]


def test_both_distributions_carry_the_mit_licence() -> None:
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")
    for project in (SERVER, CLIENT):
        assert (project["license"], project["license-files"]) == ("MIT", ["LICENSE"])
    assert (ROOT / "client" / "LICENSE").resolve() == (ROOT / "LICENSE").resolve()


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## (.*)$", text, re.MULTILINE)
    assert versions, "no version section"
    assert versions[0] in {"[Unreleased]", f"[{SERVER['version']}]"} or versions[0].startswith(
        f"[{SERVER['version']}] - "
    )
    for heading in versions[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", heading), heading
    kinds = re.findall(r"^### (.*)$", text, re.MULTILINE)
    assert kinds, "no kind of change"
    assert set(kinds) <= KINDS
