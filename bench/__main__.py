"""`python -m bench [dit|attention] ...` times the engine; `python -m bench magcache ...` counts and times the DiT
forwards of a preset with and without MagCache (magcache.py); `python -m bench project|plot ...` post-processes."""

import sys

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "project":
        from bench.projection import main
    elif what == "plot":
        from bench.plot import main
    elif what == "magcache":
        from bench.magcache import main
    else:
        from bench.run import main
    if what in ("project", "plot", "magcache"):
        sys.argv.pop(1)
    main()
