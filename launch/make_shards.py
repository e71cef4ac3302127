"""Write a task pool: the same command as `metagan-make-shards` (see --help)."""

from metagan_dist.data.make_shards import main

if __name__ == "__main__":
    main()
