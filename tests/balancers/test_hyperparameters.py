"""Every balancer's hyperparameters are checked against the range its paper allows, with one error style:
"<Balancer>: <argument> must be <range>; received <argument>=<value>."."""

import inspect
import math

import pytest

from keras_dbmtl import balancers
from keras_dbmtl.balancers import registry

# (name, arguments) -> the argument the error must name. The ranges, with the paper's reason:
OUT_OF_RANGE = [
    ("dbmtl", dict(eps=-1.0), "eps"),                      # log(l + eps) needs eps > 0 (negative weights else)
    ("ew", dict(eps=0.0), "eps"),
    ("dbmtl", dict(beta=1.0), "beta"),                     # Eq. 6: EMA factor in [0, 1)
    ("dbmtl", dict(beta_sigma=-0.5), "beta_sigma"),        # beta / k^sigma: sigma >= 0
    ("dbmtl", dict(scaling=0.0), "scaling"),               # Eq. 7: alpha_k > 0
    ("dbmtl", dict(loss_transform="sqrt"), "loss_transform"),
    ("famo", dict(weight_learning_rate=-0.1), "weight_learning_rate"),
    ("famo", dict(weight_decay=-1e-3), "weight_decay"),
    ("cagrad", dict(c=1.0), "c"),                          # CAGrad: c in [0, 1)
    ("cagrad", dict(rescale=3), "rescale"),
    ("dwa", dict(temperature=0.0), "temperature"),
    ("excessmtl", dict(robust_step_size=0.0), "robust_step_size"),
    ("fairgrad", dict(alpha=-1.0), "alpha"),
    ("graddrop", dict(leak=1.5), "leak"),
    ("gradnorm", dict(alpha=-0.5), "alpha"),
    ("gradvac", dict(beta=-0.01), "beta"),
    ("igbv2", dict(warmup_epochs=0), "warmup_epochs"),
    ("igbv2", dict(warmup_epochs=3, base_epoch=3), "base_epoch"),
    ("igbv2", dict(exploration=0.0), "exploration"),       # the policy's sigma: a division by sigma^2
    ("igbv2", dict(policy_learning_rate=-0.01), "policy_learning_rate"),
    ("metabalance", dict(relax_factor=1.2), "relax_factor"),
    ("metabalance", dict(beta=1.0), "beta"),
    ("metabalance", dict(target=-1), "target"),
    ("mgda", dict(normalization="L2"), "normalization"),
    ("moco", dict(beta=0.0), "beta"),
    ("moco", dict(gamma=-0.1), "gamma"),
    ("moco", dict(rho=-1.0), "rho"),
    ("mtadam", dict(beta_2=1.0), "beta_2"),
    ("mtadam", dict(epsilon=0.0), "epsilon"),
    ("nash_mtl", dict(max_norm=-1.0), "max_norm"),
    ("nash_mtl", dict(update_weights_every=0), "update_weights_every"),
    ("rlw", dict(distribution="dirichlet"), "distribution"),
    ("stch", dict(mu=0.0), "mu"),
    ("stch", dict(warmup_epochs=2.5), "warmup_epochs"),
    ("stl", dict(task=-1), "task"),
    ("upgrad", dict(reg_eps=-1e-4), "reg_eps"),
    ("uw", dict(initial_log_variance=math.inf), "initial_log_variance"),
]

# The edges of the ranges, and values users pass (numpy scalars, integral floats): accepted.
IN_RANGE = [
    ("dbmtl", dict(beta=0.0, beta_sigma=0.0, scaling=2.5, eps=1e-12)), ("dbmtl", dict(scaling="median")),
    ("cagrad", dict(c=0.0, rescale=2)), ("graddrop", dict(leak=1.0)), ("gradvac", dict(beta=1.0)),
    ("gradnorm", dict(alpha=0.0)), ("metabalance", dict(relax_factor=1.0, target="b")),
    ("moco", dict(beta=1.0, rho=0.0)), ("nash_mtl", dict(max_norm=0.0)), ("stch", dict(warmup_epochs=2.0)),
    ("igbv2", dict(warmup_epochs=1, base_epoch=0)), ("stl", dict(task=2)), ("mgda", dict(normalization=None)),
]


@pytest.mark.parametrize("name,arguments,argument", OUT_OF_RANGE)
def test_out_of_range_is_rejected_naming_the_argument(name, arguments, argument):
    cls = type(registry.get(name))
    value = arguments[argument]
    with pytest.raises(ValueError) as info:
        registry.get(name, **arguments)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: {argument} must be "), message
    assert message.endswith(f"; received {argument}={value!r}."), message


@pytest.mark.parametrize("name,arguments", IN_RANGE)
def test_edges_of_the_ranges_are_accepted(name, arguments):
    balancer = registry.get(name, **arguments)
    for key, value in arguments.items():
        if isinstance(value, float):
            assert getattr(balancer, key) == value


def _hyperparameters(cls):
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.name not in ("self", "seed", "kwargs"):
            yield parameter.name, parameter.default


@pytest.mark.parametrize("name", balancers.names())
def test_every_hyperparameter_of_every_balancer_is_checked(name):
    # NaN is in no range; a string is no number and no choice of any balancer; a dict is no task.
    cls = type(registry.get(name))
    for argument, default in _hyperparameters(cls):
        bad_values = [math.nan, "not-a-value"] if not isinstance(default, str) else ["not-a-value", -1.5]
        if argument in ("target", "task"):
            bad_values = [math.nan, {"a": 1}]
        for bad in bad_values:
            with pytest.raises(ValueError, match=f"^{cls.__name__}: {argument} must be "):
                cls(**{argument: bad})
