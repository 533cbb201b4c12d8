"""`get`, `names`, serialisation of every balancer."""

import keras
import pytest

from keras_dbmtl import balancers

EXPECTED = {
    "ew", "dbmtl", "gls", "rlw", "uw", "dwa", "imtl_l", "igbv2", "famo", "stch", "stl", "mgda", "gradnorm",
    "pcgrad", "graddrop", "gradvac", "imtl_g", "imtl", "cagrad", "mtadam", "nash_mtl", "metabalance", "moco",
    "aligned_mtl", "fairgrad", "excessmtl", "upgrad", "config",
}


def test_names_and_get():
    assert set(balancers.names()) == EXPECTED
    for name in balancers.names():
        balancer = balancers.get(name)
        assert isinstance(balancer, balancers.Balancer)
        assert balancer.registered_name == name
        assert isinstance(balancer, (balancers.LossBalancer, balancers.GramianBalancer, balancers.JacobianBalancer))
        assert balancers.get(name.upper()).__class__ is balancer.__class__
    with pytest.raises(ValueError, match="Registered balancers"):
        balancers.get("no-such-method")


NON_DEFAULT = {
    "rlw": dict(distribution="uniform", seed=3), "uw": dict(initial_log_variance=0.1), "dwa": dict(temperature=1.5),
    "igbv2": dict(warmup_epochs=3, base_epoch=1, seed=2), "famo": dict(weight_learning_rate=0.01),
    "stch": dict(mu=0.5, warmup_epochs=2), "stl": dict(task="b"), "mgda": dict(normalization="l2", scale_heads=False),
    "gradnorm": dict(alpha=0.5), "pcgrad": dict(seed=4), "graddrop": dict(leak=0.2, seed=1),
    "gradvac": dict(beta=0.3), "cagrad": dict(c=0.3, rescale=2), "mtadam": dict(beta_3=0.5),
    "nash_mtl": dict(max_norm=0.0, update_weights_every=3), "metabalance": dict(relax_factor=0.5, target="b"),
    "moco": dict(beta=0.2, rho=0.1), "fairgrad": dict(alpha=2.0), "excessmtl": dict(robust_step_size=0.1),
    "upgrad": dict(reg_eps=1e-3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_round_trip(name):
    cls = type(balancers.get(name))
    balancer = cls(**NON_DEFAULT.get(name, {}))
    config = balancer.get_config()
    restored = cls.from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(balancer)
    again = balancers.get(serialized)                                  # a config dict is accepted by get()
    assert type(again) is cls and again.get_config() == config


@pytest.mark.parametrize("name", sorted(EXPECTED - {"gls", "famo", "stch"}))
def test_log_transform_composes(name):
    cls = type(balancers.get(name))
    balancer = cls(loss_transform="log")
    assert balancer.loss_transform == "log"
    assert cls.from_config(balancer.get_config()).loss_transform == "log"


def test_get_passes_constructor_arguments():
    balancer = balancers.get("dbmtl", beta=0.5, beta_sigma=0.5)
    assert (balancer.beta, balancer.beta_sigma) == (0.5, 0.5)
    with pytest.raises(ValueError, match="need a balancer name"):
        balancers.get(balancers.EW(), beta=0.5)
