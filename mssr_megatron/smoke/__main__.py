"""Run one smoke check in this process and write its result as JSON (see mssr_megatron.smoke)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback


def main(argv: list[str] | None = None) -> int:
    from mssr_megatron.cli import _setup_logging
    from mssr_megatron.metrics import json_safe
    from mssr_megatron.smoke import CHECKS, SkipCheck, SmokeOptions, check_function, repo_root

    parser = argparse.ArgumentParser(prog="python -m mssr_megatron.smoke")
    parser.add_argument("check", choices=[c.name for c in CHECKS])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--result", required=True, help="JSON file the result is written to")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging()
    check = next(c for c in CHECKS if c.name == args.check)
    opts = SmokeOptions(cpu=args.cpu, run_dir=args.run_dir, repo=repo_root())
    start = time.perf_counter()
    try:
        out = check_function(check)(opts)
        result = {"status": "PASS", "figure": out.pop("figure"), "details": out}
    except SkipCheck as exc:
        result = {"status": "SKIPPED", "figure": str(exc), "reason": str(exc)}
    except Exception as exc:  # any error is this check's FAIL, with the traceback in the report
        result = {"status": "FAIL", "figure": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()}
    result.update(name=check.name, seconds=time.perf_counter() - start)
    with open(args.result, "w") as fh:
        json.dump(json_safe(result), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
