"""metagan-make-shards: write a task pool (WebDataset shards + index.json) from one of four sources.

metagan-make-shards glyphs [--out DIR] [--seed 0]
metagan-make-shards image-folder ROOT --out DIR [--channels 1] [--size 32]
metagan-make-shards arrays IMAGES.npy LABELS.npy --out DIR
metagan-make-shards torchvision {omniglot,mnist,emnist,fashion-mnist,cifar100} --root DIR --out DIR
"""

from __future__ import annotations

import argparse
import shlex
import sys

from metagan_dist.data.manifest import PoolError
from metagan_dist.data.writer import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, TaskSource, write_pool

PROGRAM = "metagan-make-shards"


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per source, shared output options."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--out", help="pool folder to create (must not exist unless --overwrite)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing pool folder")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="tasks per shard at most (%(default)s)")
    images.add_argument("--maxsize", type=int, default=DEFAULT_MAXSIZE, help="bytes per shard at most (%(default)s)")
    images.add_argument(
        "--channels", type=int, choices=(1, 3), help="1 grayscale, 3 RGB (default: the source's, 1 for folders)"
    )
    images.add_argument("--size", type=int, default=32, help="images are resized to SIZE x SIZE (%(default)s)")
    images.add_argument(
        "--test-fraction", type=float, default=0.15, help="seeded meta-test share of tasks (%(default)s)"
    )
    images.add_argument("--split-seed", type=int, default=0, help="seed of the meta-test split (%(default)s)")
    commands = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    glyphs = commands.add_parser(
        "glyphs", parents=[output], help="the embedded glyphs pool (matplotlib's fonts; default --out: the cache)"
    )
    glyphs.add_argument("--seed", type=int, default=0, help="rendering seed (%(default)s)")

    folder = commands.add_parser("image-folder", parents=[output, images], help="ROOT/<task>/<png|jpg|bmp>")
    folder.add_argument("root")

    arrays = commands.add_parser("arrays", parents=[output, images], help="images .npy + one label per image .npy")
    arrays.add_argument("images", help="uint8 [N, H, W], [N, H, W, C] or [N, C, H, W]")
    arrays.add_argument("labels", help="[N] task label of each image")

    from metagan_dist.data.torchvision_datasets import DATASETS, EMNIST_SPLITS

    vision = commands.add_parser(
        "torchvision",
        parents=[output, images],
        help="a torchvision dataset already on disk (omniglot: background = meta-train, evaluation = meta-test)",
    )
    vision.add_argument("dataset", choices=DATASETS)
    vision.add_argument("--root", required=True, help="the root folder you gave torchvision")
    vision.add_argument("--emnist-split", choices=EMNIST_SPLITS, default="balanced")
    return parser


def make_source(args: argparse.Namespace) -> TaskSource:
    """The TaskSource the parsed arguments describe."""
    if args.source == "image-folder":
        from metagan_dist.data.image_folder import image_folder_source

        return image_folder_source(
            args.root,
            channels=args.channels or 1,
            size=args.size,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
        )
    if args.source == "arrays":
        from metagan_dist.data.arrays import array_source, load_array_files

        images, labels = load_array_files(args.images, args.labels)
        return array_source(
            images,
            labels,
            channels=args.channels,
            size=args.size,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            info={"images": args.images, "labels": args.labels},
            where=args.images,
        )
    from metagan_dist.data.torchvision_datasets import torchvision_source

    return torchvision_source(
        args.dataset,
        args.root,
        channels=args.channels,
        size=args.size,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        emnist_split=args.emnist_split,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `metagan-make-shards` and launch/make_shards.py; bad input exits 2 with its message."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = shlex.join([PROGRAM, *argv])
    try:
        if args.source == "glyphs":
            from metagan_dist.data.glyphs import build_glyphs_pool, glyphs_pool_path

            out = args.out or glyphs_pool_path(seed=args.seed)
            build_glyphs_pool(out, args.seed, command=command, overwrite=args.overwrite)
            return
        if not args.out:
            parser.error("--out is required for this source")
        source = make_source(args)
        write_pool(
            source, args.out, command=command, maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite
        )
    except (PoolError, FileNotFoundError, FileExistsError, ValueError) as exn:
        parser.exit(2, f"{PROGRAM}: error: {exn}\n")
