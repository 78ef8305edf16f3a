"""Debian packages the checks need, installed with apt-get when missing (as root; otherwise the error
says what to run). Only the standard library is used, so this runs before any virtualenv exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


class PackageError(RuntimeError):
    """Packages are missing and could not be installed; the message says what to do."""


def missing(packages: Sequence[str]) -> list[str]:
    """Those of `packages` that dpkg does not list as installed (all of them off Debian)."""
    if shutil.which("dpkg-query") is None:
        return list(packages)
    listed = subprocess.run(
        ["dpkg-query", "--show", "--showformat", "${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {fields[0] for fields in map(str.split, listed.splitlines()) if fields[1:2] == ["ii"]}
    return [package for package in packages if package not in installed]


def install(packages: Sequence[str], alternative: str = "") -> None:
    """`apt-get install` those of `packages` that are missing (refreshing the package lists if that
    fails), as root only; `alternative` is offered in the error of a machine where we cannot."""
    needed = missing(packages)
    if not needed:
        return
    names = " ".join(needed)
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise PackageError(
            f"Debian's {names} not installed and we are not root on Debian: "
            f"`sudo apt-get install {names}`{alternative}"
        )
    command = ["apt-get", "install", "-y", "--no-install-recommends", *needed]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    output = ""
    for attempt in (command, ["apt-get", "update"], command):
        result = subprocess.run(attempt, env=env, capture_output=True, text=True, check=False)
        output += result.stdout + result.stderr
        if attempt is command and result.returncode == 0 and not missing(needed):
            return
    raise PackageError(f"could not install Debian's {names}:\n{output[-4000:]}")
