"""Programs the tests run, installed with apt where missing and allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import TracebackType
from typing import Self

__all__ = ["Started", "ensure"]


def ensure(binary: str, package: str) -> str | None:
    """Return the path of ``binary``, installing ``package`` with apt when running as root."""

    def find() -> str | None:
        # Debian puts both in /usr/sbin, which is not on every user's PATH.
        return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin")

    found = find()
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # Said on the real stderr, past pytest's capture: a minute of apt is no silent pause.
    print(f"tests: {binary} not found, installing {package} with apt-get", file=sys.__stderr__)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", package], check=False, env=env, capture_output=True
    )
    return find()


class Started:
    """A process the tests run, as a context manager: :meth:`start` on the way in,
    :meth:`stop` on the way out."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
