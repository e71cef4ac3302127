"""metagan_dist: meta-learn a GAN over a pool of tasks so it adapts to a new one in a few steps."""

from metagan_dist.episode import EpisodeBatch, draw_episode
from metagan_dist.meta import MetaConfig, MetaGradients, MetaLearner, meta_gradients
from metagan_dist.models import build_pair

__all__ = ["EpisodeBatch", "MetaConfig", "MetaGradients", "MetaLearner", "build_pair", "draw_episode", "meta_gradients"]
__version__ = "0.1.0"
