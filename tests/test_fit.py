"""The fit test: each architecture, trained from scratch as a GAN on the 4 shots of a held-out glyph task,
draws that task (20-way recognizability >= 0.9) within a budget that runs in about a minute on the CPU.

It proves the nets and the loss can learn one task at all, through the library's own inner loop
(`Adaptation` with the per-task Adam), so a meta-learning failure cannot hide a model that cannot fit.
The judge is the evaluation's: the corruption-trained recognition net cached beside the pool
(trained on the meta-train tasks on first use), prototypes from each task's images other than the shots.
Three tasks are fitted side by side as three independent GANs, and at least two of them must reach 0.9,
since a single GAN run is chaotic and its rounding differs between CPUs: the first task scored 0.89 on
one machine and 0.98 on another, and 0.41 (mlp) / 0.50 (dcgan) on a 2-core Intel Xeon, where its samples
drew the character in speckle, some in the weight of its one bold shot. Two torch threads
(FIT_THREADS), so the trajectory does not depend on the machine's core count. The latent pair's heads
fit over the pool's autoencoder as shipped (12 epochs, cached in the pool's folder; with 1 or 4 epochs
its decoder could not draw every task), trained with every core. Slow: about 15 s (mlp), 95 s (dcgan)
and 30 s (latent) on two idle cores, plus the judge's and the autoencoder's training (about 2 min
each) on a fresh machine.
"""

import pytest
import torch

from metagan_dist.autoencoder import pool_autoencoder
from metagan_dist.config import ModelConfig
from metagan_dist.data import Pool, ensure_glyphs_pool
from metagan_dist.evaluation.evaluate import meta_train_images
from metagan_dist.evaluation.features import RECOGNITION_FILE, load_or_train_feature_net, uint8_to_unit_range
from metagan_dist.evaluation.metrics import recognizability
from metagan_dist.inner import InnerAdam
from metagan_dist.meta import MetaConfig, MetaLearner
from metagan_dist.models import install_autoencoder

pytestmark = pytest.mark.slow
SHOTS, WAYS, FITTED, SAMPLES = 4, 20, 3, 64
# A plain GAN recipe (Adam 2e-3, β 0.5/0.999, 16 fakes a step, one D step), not the meta-learning one.
STEPS, RULE, FAKES = {"mlp": 1200, "dcgan": 500, "latent": 300}, InnerAdam(2e-3, (0.5, 0.999)), 16
FIT_THREADS = 2  # a fixed count, not the machine's: CI's two cores (one thread gave the same scores, 1.6x slower)


@pytest.fixture(scope="module")
def glyph_tasks():
    """The pool, the judge, and WAYS held-out tasks' images in [-1, 1] (the first SHOTS of each are its shots)."""
    pool = Pool(ensure_glyphs_pool())
    judge = load_or_train_feature_net(pool.path / RECOGNITION_FILE, *meta_train_images(pool), corruptions=True,
                                      progress=False)
    tasks = pool.load_tasks("test", pool.keys("test")[:WAYS])
    return pool, judge, [uint8_to_unit_range(images) for images in tasks.values()]


@pytest.mark.parametrize("arch", ["mlp", "dcgan", "latent"])
def test_a_gan_from_scratch_learns_the_4_shots_of_one_task(glyph_tasks, arch):
    pool, judge, tasks = glyph_tasks
    model = ModelConfig(arch=arch)
    torch.manual_seed(0)
    nets = model.build(tuple(pool.image_shape))
    # The latent pair's autoencoder: trained (or loaded) with its own seed, so the global one stays as the other
    # nets left it, and with every core (the session's count), which halves its time on two.
    if arch == "latent":
        install_autoencoder(nets, pool_autoencoder(pool, model.code_dim, model.autoencoder_epochs, progress=False))
    torch.set_num_threads(FIT_THREADS)  # for the fit only: tests/conftest.py gives the session's count back
    learner = MetaLearner(*nets, MetaConfig(algorithm="reptile"))
    shots = torch.stack([images[:SHOTS] for images in tasks[:FITTED]])  # FITTED tasks fitted side by side
    fit = learner.start_adaptation(learner.G.flat_parameters(), learner.D.flat_parameters(), FITTED, (RULE, RULE))
    noise = torch.Generator().manual_seed(0)
    z_dim = learner.G.module.z_dim
    real = [judge.features(images[SHOTS:]) for images in tasks]  # every task's images but its shots
    prototypes = torch.stack([features.mean(0) for features in real])

    def recognised() -> list[float]:
        """Each fitted task's 20-way recognizability; the other tasks stand in with their own images."""
        with torch.no_grad():
            samples = learner.G(fit.generator, torch.randn(FITTED, SAMPLES, z_dim, generator=noise))
        features = [judge.features(s) for s in samples] + real[FITTED:]
        return recognizability(features, prototypes, ways=WAYS)[:FITTED]

    before = recognised()
    fit.advance(shots, torch.randn(STEPS[arch], FITTED, FAKES, z_dim, generator=noise),
                torch.rand(STEPS[arch], FITTED, FAKES, generator=noise))
    after = recognised()
    assert max(before) < 0.5, f"a random {arch} init already draws the tasks: {before}"
    assert sorted(after)[-2] >= 0.9, f"{arch} fitted to 4 shots for {STEPS[arch]} steps: recognizability {after}"
