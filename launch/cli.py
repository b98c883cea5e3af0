"""The `k5` command (pyproject [project.scripts]) and `python -m k5`: one entry point, a subcommand per tool.

    k5 generate --model M --prompt "a cat" --output cat.mp4        (= python launch/generate.py ...)
    torchrun --nproc_per_node=8 -m k5 generate --model M ...        (any parallel layout, as generate.py)
    k5 serve --model M --state-dir DIR                              (an HTTP server: OpenAI videos/images API)
    torchrun --nproc_per_node=8 -m k5 serve --model M ...           (the server on any parallel layout)
    k5 variants [--markdown|--json] [--world-size N]               (the catalogue of official checkpoints)
    k5 bench [dit|attention|magcache|mask|serve|syncs|project|plot|summary] ...   (= python -m k5.bench ...; a checkout)
"""

from __future__ import annotations

import sys

COMMANDS = {
    "generate": "generate videos (MP4) and images (PNG): one prompt or a batch job (`k5 generate --help`)",
    "serve": "an HTTP server that keeps the model loaded: OpenAI-compatible videos and images API, a web page "
             "(`k5 serve --help`)",
    "variants": "the catalogue of official checkpoints and their settings (`k5 variants --help`)",
    "bench": "benchmarks (bench/; only in a checkout of the repository: `k5 bench --help`)",
}
EXIT_USAGE = 2


def usage() -> str:
    lines = ["usage: k5 COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    lines += ["", "k5 --version prints the version; torchrun -m k5 generate ... runs on several processes."]
    return "\n".join(lines)


def _bench_module_ready() -> bool:
    """Whether ``k5.bench`` can be imported: the bench/ folder of the checkout the k5 package belongs to (bench/ is a
    namespace portion of k5, found through ``k5.__path__``; it is not part of an installed wheel)."""
    import importlib.util

    return importlib.util.find_spec("k5.bench") is not None and importlib.util.find_spec("k5.bench.run") is not None


def run_bench(argv: list[str]) -> int:
    import runpy

    if not _bench_module_ready():
        print("error: k5 bench needs a checkout of the k5 repository (the benchmark in bench/ is not part of the "
              "installed package); clone it, install it with ./install.sh and run `k5 bench`",
              file=sys.stderr)
        return EXIT_USAGE
    saved = sys.argv
    sys.argv = ["k5 bench", *argv]  # bench/__main__.py dispatches on sys.argv, as `python -m k5.bench` gives it
    try:
        runpy.run_module("k5.bench", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        import k5

        print(f"k5 {k5.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from k5.launch.generate import main as generate

        saved = sys.argv[0]
        sys.argv[0] = "k5 generate"  # argparse's prog: usage lines and errors name the command as typed
        try:
            return generate(rest)
        finally:
            sys.argv[0] = saved
    if command == "serve":
        from k5.serve.server import main as serve

        return serve(rest)
    if command == "variants":
        from k5.launch.k6 import variants  # the Kandinsky 5 catalogue, then the Kandinsky 6 checkpoints

        return variants(rest)
    if command == "bench":
        return run_bench(rest)
    import difflib

    close = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"did you mean `k5 {close[0]}`?" if close else f"one of {', '.join(COMMANDS)}"
    print(f"error: unknown command {command!r}; {hint}\n\n{usage()}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
