"""`python -m k5.bench [dit|attention] ...` times the engine; `python -m k5.bench magcache ...` counts and times the DiT
forwards of a preset with and without MagCache (magcache.py); `python -m k5.bench syncs ...` looks for device-to-host
syncs in the denoising step on a GPU (syncs.py); `python -m k5.bench mask ...` times NABLA's mask build beside its
attention (mask.py); `python -m k5.bench serve ...` compares requests to a running `k5 serve` with separate CLI runs
(serve.py); `python -m k5.bench project|plot|summary ...` post-processes; `python -m k5.bench k6` times the Kandinsky 6
DiT (k6.py) and `python -m k5.bench k6-project` projects it (k6_projection.py)."""

import sys

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "project":
        from k5.bench.projection import main
    elif what == "plot":
        from k5.bench.plot import main
    elif what == "magcache":
        from k5.bench.magcache import main
    elif what == "syncs":
        from k5.bench.syncs import main
    elif what == "summary":
        from k5.bench.summary import main
    elif what == "mask":
        from k5.bench.mask import main
    elif what == "serve":
        from k5.bench.serve import main
    elif what == "k6-project":
        from k5.bench.k6_projection import main
    elif what == "k6":
        from k5.bench.k6 import main
    else:
        from k5.bench.run import main
    if what in ("project", "plot", "magcache", "syncs", "summary", "mask", "serve", "k6-project", "k6"):
        sys.argv.pop(1)
    code = main()
    sys.exit(code if isinstance(code, int) else 0)  # the commands that judge (syncs) return their exit status
