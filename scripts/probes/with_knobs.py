"""Run a probe script with module-level knobs of moeserve set first, for A/B timings in one device call.
Usage: PYTHONPATH=. python3 scripts/probes/with_knobs.py moeserve.kernels.ep_transport.NVFP4_RECEIVE_ROWS=4 [...] \
         -- scripts/probes/ep_profile.py 8 4096 fp8 high-throughput
Each value is a Python literal; the knob must already exist (a typo fails instead of timing the default)."""

import ast
import importlib
import runpy
import sys


def main():
    args = sys.argv[1:]
    if "--" not in args:
        raise SystemExit(__doc__)
    split = args.index("--")
    for knob in args[:split]:
        target, _, value = knob.partition("=")
        module_name, _, name = target.rpartition(".")
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            raise SystemExit(f"{module_name} has no {name}")
        setattr(module, name, ast.literal_eval(value))
        print(f"# {target} = {value}", flush=True)
    sys.argv = args[split + 1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
