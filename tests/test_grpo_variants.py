"""GRPO's variants beside the loss family: the cispo and sapo losses, the RLOO and REINFORCE++ advantages, the
entropy bonus and the 80/20 rule's high-entropy tokens, rewards normalized per function, and dynamic sampling.
Each against values computed by hand, then in short runs of the tiny random model."""

import math

import pytest
import torch

from rl.objectives import grpo_loss, group_advantages, high_entropy_mask, normalize_per_function
from rl.trainer import GRPOTrainer
from tests.helpers import crash_at, run_config
from tests.test_trainer import read_metrics

REWARDS = f"{__file__.rsplit('/', 1)[0]}/reward_fns.py"


# ------------------------------------------------------------------------------------ advantages


def test_rloo_subtracts_the_mean_of_the_other_completions():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    # 1 - 0 = 1; 0 - 1/3; group 2: 2 - 6, 4 - 16/3, 6 - 14/3, 8 - 4
    expected = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, -4.0, -4 / 3, 4 / 3, 4.0])
    torch.testing.assert_close(group_advantages(rewards, 4, "none", estimator="rloo"), expected)
    # with the group's std, as grpo.scale_rewards group asks
    std = torch.tensor([0.5] * 4 + [math.sqrt(20 / 3)] * 4)
    torch.testing.assert_close(group_advantages(rewards, 4, "group", estimator="rloo"), expected / (std + 1e-4))


def test_reinforce_pp_normalizes_group_centred_rewards_over_the_batch():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])  # mean 0, unbiased std sqrt(0.5 / 3)
    expected = centred / (math.sqrt(0.5 / 3) + 1e-4)
    for scale in ("group", "none"):  # its own normalization; grpo.scale_rewards does not apply
        torch.testing.assert_close(group_advantages(rewards, 2, scale, estimator="reinforce_pp"), expected)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, 2, estimator="ppo")
    # two rewards in all (one group of 2): still normalized, to +-1/sqrt(2); one reward alone has no spread: 0
    two = group_advantages(torch.tensor([1.0, 0.0]), 2, estimator="reinforce_pp")
    torch.testing.assert_close(two, torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-4))
    assert group_advantages(torch.tensor([3.0]), 1, estimator="reinforce_pp").tolist() == [0.0]


def test_rewards_normalized_per_function_within_each_group():
    # two functions, two groups of 3; function 1 has a 100x range and one None (NaN) in group 2
    per_fn = torch.tensor([[100.0, 1.0], [0.0, 0.0], [200.0, 1.0],
                           [5.0, 0.0], [math.nan, 1.0], [5.0, 1.0]])
    out = normalize_per_function(per_fn, 3)
    # group 1, function 0: mean 100, std 100; function 1: mean 2/3, std sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected = [[0.0, (1 / 3) / (s + 1e-4)], [-100 / (100 + 1e-4), (-2 / 3) / (s + 1e-4)],
                [100 / (100 + 1e-4), (1 / 3) / (s + 1e-4)]]
    torch.testing.assert_close(out[:3], torch.tensor(expected))
    # group 2, function 0: two values, both 5: centred 0; the None stays None
    assert out[3, 0] == 0 and out[5, 0] == 0 and math.isnan(out[4, 0])
    torch.testing.assert_close(out[3:, 1], torch.tensor([-2 / 3, 1 / 3, 1 / 3]) / (s + 1e-4))
    # two different values among Nones: their own mean and unbiased std (n - 1 = 1), the Nones left out of both
    sparse = normalize_per_function(torch.tensor([[1.0], [math.nan], [3.0], [math.nan]]), 4)
    torch.testing.assert_close(sparse[[0, 2], 0], torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-4))
    assert math.isnan(sparse[1, 0]) and math.isnan(sparse[3, 0])
    # a function with a single value in a group gives 0 there
    single = normalize_per_function(torch.tensor([[1.0], [math.nan]]), 2)
    assert single[0, 0] == 0 and math.isnan(single[1, 0])


# ------------------------------------------------------------------------------------ losses


def _inputs(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(b, t, generator=g) * 2).requires_grad_()
    old = logps.detach() + torch.randn(b, t, generator=g) * 0.4  # ratios on both sides of the caps
    mask = torch.ones(b, t)
    mask[0, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0])
    return logps, old, mask, adv


def test_cispo_is_the_capped_detached_weight_times_the_log_probability():
    logps, old, mask, adv = _inputs()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="cispo", epsilon_high=0.3,
                              num_items_in_batch=20.0)
    ratio = torch.exp(logps.detach() - old)
    weight = torch.clamp(ratio, max=1.3)
    expected = (-(weight * adv[:, None] * logps.detach()) * mask).sum() / 20.0
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # the weight is detached: the gradient is -w A / N on every real token, capped ones included (not zero)
    torch.testing.assert_close(logps.grad, -(weight * adv[:, None]) * mask / 20.0)
    capped = (ratio > 1.3) & (adv[:, None] > 0) & mask.bool()
    assert capped.any() and (logps.grad[capped] != 0).all()
    assert metrics["clip_ratio/high_mean"] == pytest.approx(float(capped.sum() / mask.sum()))
    assert metrics["clip_ratio/low_mean"] == 0


def test_sapo_gates_the_ratio_softly():
    logps, old, mask, adv = _inputs(seed=1)
    loss, metrics = grpo_loss(logps, old, None, adv, mask, loss_type="sapo", sapo_temperatures=(1.0, 1.05))
    ratio = torch.exp(logps.detach() - old)
    tau = torch.where(adv > 0, 1.0, 1.05)[:, None]
    per_token = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv[:, None]
    expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()  # grpo's normalization
    torch.testing.assert_close(loss, expected)
    loss.backward()
    sig = torch.sigmoid(tau * (ratio - 1))
    grad = -4 * sig * (1 - sig) * ratio * adv[:, None] * mask / mask.sum(-1, keepdim=True) / 3
    torch.testing.assert_close(logps.grad, grad)
    assert metrics["clip_ratio/region_mean"] == 0


def test_sapo_on_policy_gives_grpos_gradient():
    """At ratio 1 the gate's slope is 1 (4 sigma'(0) = 1): SAPO's first pass is GRPO's."""
    grads = []
    for loss_type in ("sapo", "grpo"):
        logps, _, mask, adv = _inputs(seed=2)
        grpo_loss(logps, logps.detach(), None, adv, mask, loss_type=loss_type)[0].backward()
        grads.append(logps.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_entropy_bonus_and_high_entropy_tokens():
    logps, old, mask, adv = _inputs(seed=3)
    entropy = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
    selected = high_entropy_mask(entropy.detach(), mask, 0.25)
    real = entropy.detach()[mask.bool()]
    threshold = torch.quantile(real, 0.75)
    assert torch.equal(selected.bool(), (entropy.detach() >= threshold) & mask.bool())
    assert real.numel() == 13 and int(selected.sum()) == 4  # the 0.75 quantile of 13 is the 10th value: 10..13
    base, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=13.0, policy_mask=selected)
    full, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=13.0)
    ratio = torch.exp(logps.detach() - old)
    per_token = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None])
    torch.testing.assert_close(base, (per_token * selected * mask).sum() / 13.0)
    torch.testing.assert_close(full, (per_token * mask).sum() / 13.0)
    # the bonus: minus coef times the loss type's mean entropy over every real token, selected or not
    with_bonus, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=13.0,
                              policy_mask=selected, entropy=entropy, entropy_coef=0.01)
    torch.testing.assert_close(with_bonus, base - 0.01 * (entropy.detach() * mask).sum() / 13.0)
    with_bonus.backward()
    torch.testing.assert_close(entropy.grad, -0.01 * mask / 13.0)
    assert high_entropy_mask(entropy.detach(), torch.zeros(3, 5), 0.2).sum() == 0
    with pytest.raises(ValueError, match="entropy_coef needs entropy"):
        grpo_loss(logps, old, None, adv, mask, entropy_coef=0.1)


# ------------------------------------------------------------------------------------ runs


@pytest.mark.parametrize("grpo,rewards", [
    ({"loss_type": "cispo", "epsilon_high": 4.0}, {}),
    ({"loss_type": "sapo", "num_iterations": 2}, {}),
    ({"advantage": "rloo", "scale_rewards": "none"}, {}),
    ({"advantage": "reinforce_pp"}, {}),
    ({"entropy_coef": 0.01, "top_entropy_quantile": 0.2}, {}),
    ({}, {"functions": [f"{REWARDS}:token_reward", f"{REWARDS}:token_value_or_none"], "normalize": "per_function"}),
])
def test_short_runs_train(tmp_path, grpo, rewards):
    trainer = GRPOTrainer(run_config(tmp_path, grpo=grpo, rewards=rewards,
                                     train={"max_steps": 2, "micro_batch_size": 3}))  # 8 rows: 3 + 3 + 2
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters() if v.requires_grad)
    if "top_entropy_quantile" in grpo:
        assert all(0.15 < r["entropy/selected_fraction"] < 0.45 for r in rows)  # per micro-batch: ~20%, ties up


def test_per_function_normalization_changes_the_advantages_not_the_reward_metrics(tmp_path):
    functions = [f"{REWARDS}:token_reward", f"{REWARDS}:wide_token_reward"]
    seen = {}
    for normalize in ("none", "per_function"):
        trainer = GRPOTrainer(run_config(tmp_path / normalize, rewards={"functions": functions,
                                                                        "normalize": normalize}))
        batch = trainer.rollout(trainer.take(2), 1)
        signal, metrics = trainer.score(batch)
        seen[normalize] = signal, metrics["reward"], batch["rewards"]
    per_fn = torch.stack([torch.tensor([sum(ids) % 97 / 97 for ids in batch["completion_ids"]]),
                          torch.tensor([1000.0 * (ids[0] % 2) for ids in batch["completion_ids"]])], dim=1)
    torch.testing.assert_close(seen["per_function"][0], normalize_per_function(per_fn, 4).nansum(1))
    torch.testing.assert_close(seen["none"][0], per_fn.sum(1))
    assert seen["none"][1] == seen["per_function"][1]  # the reported reward is the raw one either way
    torch.testing.assert_close(seen["per_function"][2], per_fn.sum(1))


# ------------------------------------------------------------------------------------ dynamic sampling


def _dynamic(tmp_path, **train):
    return run_config(tmp_path, grpo={"dynamic_sampling": True, "max_resample_rounds": 2},
                      rewards={"functions": [f"{REWARDS}:flat_unless_multiple_of_3"]},
                      data={"task": "arithmetic", "num_examples": 16, "shuffle": False},
                      train={"max_steps": 2, **train})


def test_dynamic_sampling_drops_groups_without_signal(tmp_path):
    """Rows whose answer is not a multiple of 3 get the same reward for every completion (no signal): they are
    dropped and more prompts drawn until the step has prompts_per_step informative groups, or the rounds run
    out (then dropped groups fill the batch)."""
    trainer = GRPOTrainer(_dynamic(tmp_path))
    trained = []
    update = trainer.update

    def spy(batch, advantages):
        trained.append(list(batch["rows"]))
        return update(batch, advantages)

    trainer.update = spy
    drawn = []
    take = trainer.take
    trainer.take = lambda n: drawn.append(take(n)) or drawn[-1]
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    flat = {r for r in range(len(trainer.dataset)) if int(trainer.dataset[r]["answer"]) % 3 != 0}
    order = [r for d in drawn for r in d]
    assert order == list(range(len(order)))  # shuffle off: the stream walks the rows in order, round by round
    start = 0
    for metrics, used in zip(rows, trained):
        assert len(used) == 8 and all(len(set(used[i:i + 4])) == 1 for i in range(0, 8, 4))
        drawn_now = order[start:start + metrics["dynamic_sampling/prompts"]]
        start += metrics["dynamic_sampling/prompts"]
        assert metrics["dynamic_sampling/prompts"] == 2 * (1 + metrics["dynamic_sampling/rounds"])
        informative = [r for r in drawn_now if r not in flat]
        groups = [used[0], used[4]]
        # the first informative rows drawn are trained, topped up with dropped ones (in the order drawn)
        assert groups == (informative + [r for r in drawn_now if r in flat])[:2]
        assert metrics["dynamic_sampling/groups_dropped"] == len(drawn_now) - len(informative)
        assert metrics["dynamic_sampling/groups_filled"] == max(0, 2 - len(informative))
        # rounds stop as soon as two informative groups are in, or at the cap
        assert len(informative) >= 2 or metrics["dynamic_sampling/rounds"] == 2
    assert sum(r["dynamic_sampling/groups_dropped"] for r in rows) >= 1
    assert any(r["dynamic_sampling/rounds"] > 0 for r in rows)


def test_dynamic_sampling_resumes_exactly(tmp_path):
    straight = GRPOTrainer(_dynamic(tmp_path / "a", max_steps=3))
    straight.train()
    expected = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    config = _dynamic(tmp_path / "b", max_steps=3, save_every=2)
    crash_at(GRPOTrainer(config), 3)
    resumed = GRPOTrainer(config, resume="latest")
    resumed.train()
    got = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    for key in ("reward", "loss", "grad_norm", "dynamic_sampling/rounds", "dynamic_sampling/prompts",
                "dynamic_sampling/groups_dropped"):
        assert got[2][key] == pytest.approx(expected[2][key], rel=1e-5, abs=1e-7), key
    assert resumed.stream.state_dict() == straight.stream.state_dict()


# ------------------------------------------------------------------------------------ against TRL 1.15


class _Accelerator:  # one process: TRL's collectives are the identity
    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    gather_for_metrics = reduce = pad_across_processes = lambda self, x, **kwargs: x


def _trl_loss(loss_type, logps, old, adv, mask, entropy, *, epsilon_high, quantile=1.0, entropy_coef=0.0,
              num_items=None):
    """TRL 1.15's GRPOTrainer._compute_loss on given log-probabilities and entropies: the method itself, run
    on a stand-in trainer whose forward returns them (one process, no accumulation, token-level ratios)."""
    from types import SimpleNamespace

    from trl import GRPOTrainer as TRLGRPOTrainer

    b, t = logps.shape
    args = SimpleNamespace(delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                           use_bias_correction_kl=False, steps_per_generation=1)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None), aux_loss_enabled=False,
        top_entropy_quantile=quantile, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=0.0, loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, args=args, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        max_completion_length=t, _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, _metrics={"train": __import__("collections").defaultdict(list)})
    stub.get_high_entropy_mask = lambda *a: TRLGRPOTrainer.get_high_entropy_mask(stub, *a)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    return TRLGRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("loss_type,quantile,coef", [("cispo", 1.0, 0.0), ("sapo", 1.0, 0.0), ("grpo", 0.3, 0.0),
                                                     ("dapo", 1.0, 0.02), ("dapo", 0.2, 0.0)])
def test_losses_equal_trls(loss_type, quantile, coef):
    """The loss and its gradients (log-probabilities and entropies) equal TRL's for one micro-batch. TRL's
    entropy bonus is a plain token mean whatever the loss type; ours is the loss type's own mean, which for dapo
    over one micro-batch is the same."""
    logps, old, mask, adv = _inputs(seed=5)
    entropy = torch.rand(3, 5, generator=torch.Generator().manual_seed(6)).requires_grad_()
    trl_logps, trl_entropy = logps.detach().clone().requires_grad_(), entropy.detach().clone().requires_grad_()
    # TRL's cispo cap is epsilon_high itself, ours 1 + epsilon_high
    theirs, trl_metrics = _trl_loss(loss_type, trl_logps, old, adv[:, None], mask, trl_entropy,
                                    epsilon_high=1.3 if loss_type == "cispo" else 0.28, quantile=quantile,
                                    entropy_coef=coef)
    selected = high_entropy_mask(entropy.detach(), mask, quantile) if quantile < 1 else None
    ours, metrics = grpo_loss(logps, old, None, adv, mask, loss_type=loss_type,
                              epsilon_high=0.3 if loss_type == "cispo" else 0.28,
                              num_items_in_batch=float(mask.sum()), policy_mask=selected,
                              entropy=entropy if coef else None, entropy_coef=coef)
    torch.testing.assert_close(ours, theirs)
    (ours + 0 * entropy.sum()).backward()
    (theirs + 0 * trl_entropy.sum()).backward()
    torch.testing.assert_close(logps.grad, trl_logps.grad)
    torch.testing.assert_close(entropy.grad, trl_entropy.grad)
    if loss_type == "cispo":
        assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(trl_metrics["cispo_clip_ratio"][0])
