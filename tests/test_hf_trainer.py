"""DPTrainer (dpcompile.integrations.transformers): a tiny GPT-2 built from a config (no download) on
generated padded sequences, CPU. ε in the Trainer's logs against dp-accounting, one step's gradient
against a float64 torch.func oracle (noise off, some samples clipped, some not, two accumulated
micro-batches), resume from a Trainer checkpoint (steps and ε go on; the secret stays out of the
checkpoint; a resume without the privacy files is refused), refusals at construction."""
from __future__ import annotations

import copy
import json
import os
import shutil

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import pld_privacy_accountant
from torch.func import functional_call, grad

import transformers

import dpcompile
from dpcompile.privacy.accounting import epsilon as dpcompile_epsilon
from dpcompile.integrations.transformers import PUBLIC_STATE_FILE, DPTrainer

V, T = 32, 8  # vocabulary; every batch is padded to T tokens (one sequence length: one compiled graph)


class Sequences(torch.utils.data.Dataset):
    """n random token sequences of 3 to T tokens."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, T + 1, (n,), generator=g)
        self.items = [torch.randint(1, V, (int(k),), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i]}


def collate(features: list[dict]) -> dict:
    """Pads to T: attention mask 0 and label -100 on the padding."""
    ids = torch.zeros(len(features), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, f in enumerate(features):
        ids[b, :len(f["input_ids"])] = f["input_ids"]
        mask[b, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def arguments(output_dir, **overrides) -> transformers.TrainingArguments:
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                    report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    return transformers.TrainingArguments(str(output_dir), **{**settings, **overrides})


def direct_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of `steps` Poisson-sampled Gaussian steps, from dp-accounting's PLD accountant itself."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


# 32 sequences, expected logical batch 4 × 2 = 8: q = 1/4, an epoch is 4 steps; 8 steps planned.
N, TARGET_EPS, MAX_STEPS = 32, 3.0, 8


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A run of 8 steps at target ε = 3, logging every 3 steps, checkpoints at steps 4 and 8."""
    torch._dynamo.reset()
    out = tmp_path_factory.mktemp("hf_trainer") / "out"
    model = tiny_gpt2()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = DPTrainer(model=model, args=arguments(out, max_steps=MAX_STEPS, logging_steps=3, save_strategy="steps",
                                                    save_steps=4),
                        train_dataset=Sequences(N), eval_dataset=Sequences(8, seed=9), data_collator=collate,
                        target_epsilon=TARGET_EPS)
    trainer.train()
    return trainer, out, before


def test_a_run_logs_epsilon_of_the_steps_taken_at_the_calibrated_sigma(first_run):
    trainer, _, before = first_run
    state = dpcompile.privacy_state(trainer.model)
    sigma, q, delta = state.options.noise_multiplier, 1 / 4, N ** -1.1
    assert state.options.sample_rate == q and trainer.target_delta == delta
    assert state.steps == trainer.state.global_step == MAX_STEPS
    logged = [entry for entry in trainer.state.log_history if "epsilon" in entry]
    assert [e["dp_steps"] for e in logged if "loss" in e] == [3, 4, 6, 8]  # logging steps 3, 6 and both epoch ends
    assert {e["epoch"] for e in logged if e["step"] in (4, 8) and "loss" in e} == {1.0, 2.0}
    for entry in logged:
        assert entry["sigma"] == sigma
        assert entry["epsilon"] == pytest.approx(dpcompile_epsilon(sigma, q, entry["dp_steps"], delta), rel=1e-9)
        assert entry["epsilon"] == pytest.approx(direct_epsilon(sigma, q, entry["dp_steps"], delta), rel=0.01)
    final = logged[-1]["epsilon"]
    assert final <= TARGET_EPS and final > 0.95 * TARGET_EPS  # σ calibrated for the 8 planned steps
    assert dpcompile_epsilon(0.95 * sigma, q, MAX_STEPS, delta) > TARGET_EPS  # a smaller σ would overshoot
    assert any(not torch.equal(p, before[k]) for k, p in trainer.model.named_parameters())
    metrics = trainer.evaluate()  # the plain model, per-sequence loss, nothing released
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]
    assert trainer.state.log_history[-1]["epsilon"] == final
    assert state.steps == MAX_STEPS


def test_resume_from_a_trainer_checkpoint_continues_steps_and_epsilon(first_run, tmp_path):
    trainer, out, _ = first_run
    checkpoint = out / "checkpoint-4"
    secret_file = trainer.secret_dir + "/checkpoint-4.pt"
    seed = trainer.privacy.seed
    # the public part sits with the model, the secret (seed) apart, readable by its owner only
    public = json.loads((checkpoint / PUBLIC_STATE_FILE).read_text())
    assert public["steps"] == 4 and "seed" not in json.dumps(public)
    assert not trainer.secret_dir.startswith(str(out) + os.sep)
    assert os.stat(secret_file).st_mode & 0o077 == 0
    assert torch.load(secret_file, weights_only=True)["seed"] == seed
    for name in os.listdir(checkpoint):
        data = (checkpoint / name).read_bytes()
        assert str(seed).encode() not in data and seed.to_bytes(8, "little") not in data, name

    resumed = DPTrainer(model=tiny_gpt2(seed=1), args=arguments(out, max_steps=MAX_STEPS, logging_steps=3),
                        train_dataset=Sequences(N), data_collator=collate, target_epsilon=TARGET_EPS, dry_run=False)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    state = resumed.privacy
    assert state.seed == seed  # the secret part was restored too
    assert state.steps == resumed.state.global_step == MAX_STEPS
    logged = [e for e in resumed.state.log_history if "epsilon" in e]
    assert [e["dp_steps"] for e in logged if e["step"] > 4 and "loss" in e] == [6, 8]  # went on from step 4
    assert logged[-1]["epsilon"] == pytest.approx(trainer.privacy.epsilon(trainer.target_delta), rel=1e-12)


def test_a_resume_without_the_privacy_files_is_refused(first_run, tmp_path):
    trainer, out, _ = first_run
    bare = tmp_path / "out" / "checkpoint-4"
    shutil.copytree(out / "checkpoint-4", bare)
    os.remove(bare / PUBLIC_STATE_FILE)
    model = tiny_gpt2(seed=1)
    resumed = DPTrainer(model=model, args=arguments(tmp_path / "out", max_steps=MAX_STEPS),
                        train_dataset=Sequences(N), data_collator=collate, target_epsilon=TARGET_EPS, dry_run=False)
    with pytest.raises(dpcompile.DPCompileError, match="public privacy state .* is missing"):
        resumed.train(resume_from_checkpoint=str(bare))
    shutil.copy(out / "checkpoint-4" / PUBLIC_STATE_FILE, bare)  # the public part back, the secret still elsewhere
    with pytest.raises(dpcompile.DPCompileError, match="secret privacy state .* is missing"):
        resumed.train(resume_from_checkpoint=str(bare))
    assert resumed.privacy.steps == 0 and all(p.grad is None for p in model.parameters())


def per_sequence_loss(model, ids, mask, labels):
    """One sequence's mean next-token loss over its own labelled tokens."""
    logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0, :-1]
    return F.cross_entropy(logits, labels[1:], ignore_index=-100)


@pytest.mark.parametrize("clip_groups", [None, "block"])
def test_one_step_clips_like_the_float64_oracle(tmp_path, clip_groups):
    """Noise off, R = the median per-sample norm: p.grad at the optimizer step is
    Σ_i min(1, R/‖g_i‖) g_i / E[B] over the drawn sequences, E[B] = q·N = 8. Group-wise
    (clip_groups="block" through dp_options): the block and the rest each clipped to R/√2."""
    n = 16
    data = Sequences(n, seed=3)
    model = tiny_gpt2(seed=2)
    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    examples = collate([data[i] for i in range(n)])

    def sample_grad(b: int) -> dict:
        loss = lambda p: per_sequence_loss(lambda **kw: functional_call(model64, p, (), kw),
                                           examples["input_ids"][b], examples["attention_mask"][b],
                                           examples["labels"][b])
        return grad(loss)(params)

    grads = [sample_grad(b) for b in range(n)]
    in_block = [k for k in params if k.startswith("transformer.h.0.")]
    groups = [list(params)] if clip_groups is None else [in_block, [k for k in params if k not in in_block]]
    share = len(groups) ** -0.5  # each group's threshold is R/√K
    norms = torch.stack([torch.stack([torch.cat([row[k].flatten() for k in names]).norm() for names in groups])
                         for row in grads])  # (n, K)
    R = float(norms.median()) / share

    seen: list[dict] = []  # the micro-batches of the step, as collated

    def recording_collate(features):
        batch = collate(features)
        seen.append(batch)
        return batch

    released = {}

    class Released(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            released.update({k: p.grad.detach().clone() for k, p in model.named_parameters()})

    with pytest.warns(dpcompile.privacy.state.InsecureSeedWarning):  # a fixed draw: the test knows who is in it
        trainer = DPTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=data,
                            data_collator=recording_collate, noise_multiplier=0.0, max_grad_norm=R, dry_run=False,
                            dp_options={"insecure_seed": 5, **({"clip_groups": clip_groups} if clip_groups else {})},
                            callbacks=[Released()])
    trainer.train()
    drawn = [int(i) for batch in seen for i in _rows_of(batch, examples)]
    assert len(seen) == 2 and len(drawn) >= 2  # two micro-batches of one Poisson draw
    assert (norms[drawn] > R * share).any() and (norms[drawn] < R * share).any()  # some clipped, some not
    factors = (R * share / norms[drawn]).clamp(max=1)  # (drawn, K)
    group_of = {name: k for k, names in enumerate(groups) for name in names}
    scale = 0.0
    for name, p in model.named_parameters():
        want = sum(f[group_of[name]] * grads[b][name] for f, b in zip(factors, drawn)) / 8
        scale = max(scale, float(want.abs().max()))
        released[name] = (released[name].double(), want)
    for name, (got, want) in released.items():
        err = float((got - want).abs().max()) / scale
        assert err < 1e-5, f"{name}: error {err:.2e} relative to the largest gradient entry"


def _rows_of(batch: dict, examples: dict) -> list[int]:
    """The dataset indices of a collated batch's rows (sequences are told apart by their tokens)."""
    every = examples["input_ids"]
    return [int(((every == row).all(1)).nonzero()[0]) for row in batch["input_ids"]]


def test_a_model_with_batchnorm_is_refused_before_training(tmp_path):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1],
                                    layer_type="basic", num_labels=2)
    model = transformers.ResNetForImageClassification(cfg)
    images = [{"pixel_values": torch.randn(3, 8, 8), "labels": torch.tensor(i % 2)} for i in range(8)]
    with pytest.raises(dpcompile.DPCompileError, match=r"(?s)BatchNorm2d.*mixes samples.*GroupNorm"):
        DPTrainer(model=model, args=arguments(tmp_path, max_steps=1, gradient_accumulation_steps=1),
                  train_dataset=images, target_epsilon=3.0)
    with pytest.raises(dpcompile.DPCompileError, match="no privacy state"):
        dpcompile.privacy_state(model)  # nothing was set up, let alone trained


def test_a_loss_that_mixes_samples_is_refused_by_the_trial_step_at_construction(tmp_path):
    """HF's token mean over the whole batch, as a compute_loss_func: the dry run refuses it."""
    def batch_token_mean(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)

    model = tiny_gpt2()
    with pytest.raises(dpcompile.DPCompileError, match="a private trial step of GPT2LMHeadModel .* was refused"):
        DPTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=Sequences(N),
                  data_collator=collate, compute_loss_func=batch_token_mean, target_epsilon=3.0)
    assert all(p.grad is None for p in model.parameters())


def test_poisson_draws_vary_in_size_and_an_empty_draw_releases_noise_only(tmp_path):
    """q = 2/32: with this (test-only) seed the first 5 draws have 2, 0, 2, 2 and 5 samples. The empty
    one still takes a step, whose gradient is pure noise N(0, (σR / E[B])²), and is counted."""
    sizes, noise = [], []

    def recording_collate(features):
        sizes.append(len(features))
        return collate(features)

    class Gradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if trainer.privacy.skipped_steps == 1 and not noise:
                noise.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))

    with pytest.warns(dpcompile.privacy.state.InsecureSeedWarning):
        trainer = DPTrainer(model=tiny_gpt2(), args=arguments(tmp_path, max_steps=5, per_device_train_batch_size=2,
                                                              gradient_accumulation_steps=1),
                            train_dataset=Sequences(N), data_collator=recording_collate, noise_multiplier=1.0,
                            dry_run=False, dp_options={"insecure_seed": 6}, callbacks=[Gradients()])
    trainer.train()
    state = trainer.privacy
    assert sizes == [2, 2, 2, 5]  # Poisson sizes; the empty draw reached no collator
    assert state.steps == trainer.state.global_step == 5 and state.skipped_steps == 1
    assert len(state.compiled) == 1  # one graph with a symbolic batch dimension for sizes 2 and 5
    z = noise[0] / (1.0 * 1.0 / 2)  # σ = 1, R = 1, E[B] = 2
    assert abs(float(z.std()) - 1) < 0.1 and abs(float(z.mean())) < 0.1
