"""Programs the tests run, installed with apt where missing and allowed."""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["ensure"]


def ensure(binary: str, package: str) -> str | None:
    """Return the path of ``binary``, installing ``package`` with apt when running as root."""

    def find() -> str | None:
        # Debian puts both in /usr/sbin, which is not on every user's PATH.
        return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")

    found = find()
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", package], check=False, env=env, capture_output=True
    )
    return find()
