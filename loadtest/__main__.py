"""``python -m loadtest <tool> ...``: storm, baseline, bare, twilio, report, audio, capacity."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

TOOLS = ("storm", "baseline", "bare", "twilio", "report", "audio", "capacity")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        print(f"usage: python -m loadtest {{{','.join(TOOLS)}}} [options]", file=sys.stderr)
        return 2
    tool = sys.argv.pop(1)
    sys.argv[0] = f"python -m loadtest {tool}"
    result = importlib.import_module(f"loadtest.{tool}").main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
