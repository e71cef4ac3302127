"""Few-shot evaluation of meta-learned inits against baselines: see `python launch/evaluate.py --help`."""

from metagan_dist.evaluation.evaluate import main

if __name__ == "__main__":
    main()
