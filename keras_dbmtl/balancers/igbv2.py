r"""IGBv2: improvable gap balancing, v2 (Dai et al., "Improvable Gap Balancing for Multi-Task Learning", UAI 2023).

IGB weights the log-losses (scale-invariant) with weights chosen by a reinforcement-learning agent:

$$
\begin{aligned}
s_k &= \ell(k) / \ell_{\mathrm{base}} \qquad \text{state: the losses relative to the base epoch's mean losses} \\
w_k &= T \operatorname{softmax}(u_k), \quad u_k \sim \pi(\cdot \mid s_k) \qquad \text{action: the task weights} \\
r_k &= \min_t \big(\ell_t(k-1) - \ell_t(k)\big) / \ell_{\mathrm{base},t} \qquad \text{reward: the smallest relative loss decrease (an improvable gap)} \\
L &= \textstyle\sum_t w_t \log \ell_t \qquad \text{loss\_transform="log", the paper's scale-invariant losses}
\end{aligned}
$$

For the first `warmup_epochs` epochs the weights are random, w = T softmax(N(0, I)) (as IGBv2's code); l_base is
the mean training loss of epoch `base_epoch` (counted by `on_epoch_end`, see DWA).

Deviation, documented: the paper's agent is soft actor-critic (two 128-128 MLP critics, a Gaussian MLP actor, a
1e4-transition replay buffer, 25-50 gradient steps every 50 iterations). Training four networks from a replay
buffer inside the model's compiled train step has no counterpart in this interface (it would need a second,
balancer-owned optimiser loop with its own gradients). Here the policy is linear-Gaussian,
pi(u | s) = N(A s + b, sigma^2 I), trained on-line by the policy gradient of the one-step reward (REINFORCE with a
running-mean baseline and a running-RMS advantage scale): A <- A + lr adv (u - mu) s^T / sigma^2. It keeps the
paper's state, action space, reward and warm-up; sigma = 1 makes the initial policy the warm-up's N(0, I).
"""

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters
from keras_dbmtl.balancers.base import Disclaimed, LossBalancer
from keras_dbmtl.balancers.registry import register


@register("igbv2")
class IGBv2(LossBalancer):
    """IGBv2 with an in-graph linear-Gaussian policy-gradient agent in place of SAC. Cost: 1 backward.

    Args:
        warmup_epochs: epochs of random weights before the policy acts (default 5, IGBv2's code).
        base_epoch: the epoch whose mean losses are l_base (default 0, the first).
        policy_learning_rate: step size of the policy gradient (default 0.01).
        exploration: sigma, the policy's standard deviation (default 1.0).
        seed: seed of the balancer's `SeedGenerator`.
        loss_transform: "log" (default, IGB's scale-invariant losses) or None.
    """

    plain_single_task = Disclaimed("log transform and random weights")
    permutation_equivariant = Disclaimed("random weights during warm-up")

    def __init__(self, warmup_epochs=5, base_epoch=0, policy_learning_rate=0.01, exploration=1.0, seed=None,
                 loss_transform="log", eps=1e-8, **kwargs):
        super().__init__(loss_transform=loss_transform, eps=eps, **kwargs)
        check_hyperparameters(self, warmup_epochs=(warmup_epochs, "int [1, inf)"),
                              base_epoch=(base_epoch, f"int [0, {warmup_epochs})"),
                              policy_learning_rate=(policy_learning_rate, "(0, inf)"),
                              exploration=(exploration, "(0, inf)"))
        self.warmup_epochs = int(warmup_epochs)
        self.base_epoch = int(base_epoch)
        self.policy_learning_rate = float(policy_learning_rate)
        self.exploration = float(exploration)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        super().build(num_tasks, num_shared_parameters, task_names, shared_shapes)
        state = self.state_variable
        self.epochs_seen = state((), "epochs_seen")
        self.loss_sums = state((num_tasks,), "loss_sums")
        self.loss_count = state((), "loss_count")
        self.base_losses = state((num_tasks,), "base_losses", initializer="ones")
        self.has_base = state((), "has_base")
        self.policy_matrix = state((num_tasks, num_tasks), "policy_matrix")              # A
        self.policy_bias = state((num_tasks,), "policy_bias")                            # b
        self.reward_mean = state((), "reward_mean")
        self.advantage_scale = state((), "advantage_scale", initializer="ones")
        self.previous_losses = state((num_tasks,), "previous_losses")
        self.previous_state = state((num_tasks,), "previous_state")
        self.previous_action = state((num_tasks,), "previous_action")
        self.previous_mean = state((num_tasks,), "previous_mean")

    def combine_losses(self, losses):
        raw = ops.stop_gradient(losses.raw)
        collecting = ops.cast(ops.equal(self.epochs_seen, float(self.base_epoch)), "float32")
        self.loss_sums.assign(self.loss_sums + collecting * raw)
        self.loss_count.assign(self.loss_count + collecting)
        learning = ops.logical_and(self.has_base > 0.0, self.iterations > 0)
        self.next_step()

        # Policy gradient on the previous action's reward r = min_t relative loss decrease.
        reward = ops.min((self.previous_losses - raw) / self.base_losses)
        advantage = reward - self.reward_mean
        scale = 0.99 * self.advantage_scale + 0.01 * advantage * advantage
        normalized = advantage / ops.sqrt(scale + 1e-12)
        score = (self.previous_action - self.previous_mean) / self.exploration ** 2     # d log pi / d mu
        step = self.policy_learning_rate * normalized * score
        new_matrix = self.policy_matrix + step[:, None] * self.previous_state[None, :]
        self.policy_matrix.assign(ops.where(learning, new_matrix, self.policy_matrix.value))
        self.policy_bias.assign(ops.where(learning, self.policy_bias + step, self.policy_bias.value))
        self.reward_mean.assign(ops.where(learning, 0.9 * self.reward_mean + 0.1 * reward, self.reward_mean.value))
        self.advantage_scale.assign(ops.where(learning, scale, self.advantage_scale.value))

        # Action: random during warm-up, from the policy afterwards.
        state = raw / self.base_losses
        acting = self.epochs_seen >= float(self.warmup_epochs)
        mean = ops.where(acting, ops.matmul(self.policy_matrix, state) + self.policy_bias, 0.0)
        noise = keras.random.normal((self.num_tasks,), seed=self.seed_generator)
        action = mean + self.exploration * noise
        weights = self.num_tasks * ops.softmax(action)
        self.previous_losses.assign(raw)
        self.previous_state.assign(state)
        self.previous_action.assign(action)
        self.previous_mean.assign(mean)
        return ops.sum(weights * losses.transformed), weights

    def on_epoch_end(self, epoch):
        if not self.built:
            return
        if float(ops.convert_to_numpy(self.epochs_seen)) == self.base_epoch:
            self.base_losses.assign(self.loss_sums.value / ops.maximum(self.loss_count.value, 1.0))
            self.has_base.assign(1.0)
        self.epochs_seen.assign(self.epochs_seen + 1.0)

    def get_config(self):
        config = super().get_config()
        config.update({
            "warmup_epochs": self.warmup_epochs, "base_epoch": self.base_epoch,
            "policy_learning_rate": self.policy_learning_rate, "exploration": self.exploration, "seed": self.seed,
        })
        return config
