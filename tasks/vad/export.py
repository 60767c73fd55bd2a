"""``python -m tasks.vad.export LAYOUT DEST``: the built-in data written as a feature release.

Layouts (``formats.LAYOUTS``): ``rtfm``, ``rtfm_txt``, ``urdmu``, ``xd``, ``shanghai``; see
``formats.write_release`` for what each writes.
"""
from __future__ import annotations

from pathlib import Path

from .data import VADDataModule
from .formats import LAYOUTS, write_release


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.vad.export LAYOUT DEST``: the built-in data (the configs' defaults)
    written as a release folder, to see a layout or to check a pipeline end to end."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.vad.export", description=main.__doc__)
    ap.add_argument("layout", choices=LAYOUTS)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--crops", type=int, default=None, help="default: 10, XD-Violence 5")
    args = ap.parse_args(argv)
    dm = VADDataModule()
    info = write_release(args.dest, args.layout, dm.train_videos, dm.test_videos, args.crops)
    print(f"wrote {args.dest} ({args.layout}); classes {info['classes']}"
          + (f"; read it with --data.anomalous_first {info['anomalous_first']}"
             if args.layout == "shanghai" else ""))


if __name__ == "__main__":
    main()
