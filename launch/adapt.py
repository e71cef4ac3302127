"""Adapt a meta-trained GAN to a new task from k images: see `python launch/adapt.py --help`."""

from metagan_dist.evaluation.adapt import main

if __name__ == "__main__":
    main()
