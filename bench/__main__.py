"""`python -m bench [dit|attention] ...` times the engine; `python -m bench project|plot ...` post-processes."""

import sys

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "project":
        from bench.projection import main
    elif what == "plot":
        from bench.plot import main
    else:
        from bench.run import main
    if what in ("project", "plot"):
        sys.argv.pop(1)
    main()
