"""`DPTrainer`: a Hugging Face `transformers.Trainer` that trains with DP-SGD through the dp backend.

    from dpcompile.integrations.transformers import DPTrainer

    trainer = DPTrainer(model=model, args=TrainingArguments("out", num_train_epochs=3,
                        per_device_train_batch_size=64, report_to=[]),
                        train_dataset=train, data_collator=collator, target_epsilon=3.0)
    trainer.train()                                  # ε, σ and the step count in every log line
    trainer.train(resume_from_checkpoint=True)       # continues the steps and ε of the checkpoint

What it changes in the Trainer (details in docs/transformers.md):

- the model is compiled with backend "dp" (per-sample clipping at R = ``max_grad_norm``, Gaussian
  noise σR once per logical step); σ is calibrated for ``target_epsilon`` over the planned steps;
- the train loader draws Poisson batches: each record with probability q = B / N, where the
  expected logical batch B is ``per_device_train_batch_size × gradient_accumulation_steps``; one
  draw is cut into ``gradient_accumulation_steps`` micro-batches whose clipped sums accumulate,
  the noise being added on the last; an empty draw releases noise only;
- the loss is a mean of per-sequence losses computed from the logits (never HF's token mean over
  the whole batch, which mixes samples);
- each checkpoint gets the public privacy state (``dpcompile_privacy.json``, inside it) and the
  secret one (noise and sampling seed) in ``secret_dir``, apart from the checkpoints;
  ``resume_from_checkpoint`` restores both, or refuses;
- refusals come before training: the module rules of `dpcompile.check` and one private trial step
  of a copy of the model on two training examples (``dry_run``), at construction.

Not supported (refused with a `DPCompileError`): several processes or GPUs, fp16 loss scaling,
``torch_compile=True`` (the dp backend compiles the model), ``model_init``, iterable datasets.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..privacy.accounting import calibrate_noise_multiplier
from ..compiler.backend import register_state
from ..privacy.sampling import PoissonBatchSampler
from ..engine import release_pure_noise
from ..errors import DPCompileError
from ..privacy.rng import stream_seed
from ..privacy.state import PrivacyState
from ..tools.validate import check

try:
    import transformers
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as missing:  # an optional dependency: say what to install
    raise ImportError("dpcompile.integrations.transformers needs Hugging Face transformers and accelerate: "
                      "pip install 'transformers>=4.45' accelerate") from missing

__all__ = ["DPTrainer", "PUBLIC_STATE_FILE"]

PUBLIC_STATE_FILE = "dpcompile_privacy.json"  # in each checkpoint folder, next to the model
_DRAW_KEY = "dpcompile_draw"  # the batch entry that says which Poisson draw a micro-batch belongs to


@dataclasses.dataclass(frozen=True)
class _Draw:
    """Micro-batch `chunk` of `chunks` cut from one Poisson draw (carried inside the batch itself, so
    that prefetching loaders and the Trainer's batch skipping on resume cannot misplace it)."""

    chunk: int
    chunks: int

    @property
    def last(self) -> bool:
        return self.chunk == self.chunks - 1


class _PoissonMicroBatches(Sampler[list]):
    """Per pass, `draws` Poisson draws of rate q from N records, each cut into `chunks` micro-batches
    (the largest last, so a non-empty draw ends with samples); every index list ends with its `_Draw`.

    The draws come from the privacy state's secret seed and the step a pass starts at: a resumed
    run goes on with fresh batches instead of replaying those it already used.
    """

    def __init__(self, num_samples: int, sample_rate: float, draws: int, chunks: int, state: PrivacyState) -> None:
        super().__init__()
        self.num_samples, self.sample_rate, self.draws, self.chunks = num_samples, sample_rate, draws, chunks
        self.state = state

    def __len__(self) -> int:
        return self.draws * self.chunks

    def __iter__(self):
        seed = stream_seed(self.state.seed, self.state.steps, "poisson-batches")
        draws = PoissonBatchSampler(self.num_samples, self.sample_rate, steps=self.draws,
                                    generator=torch.Generator().manual_seed(seed))
        for indices in draws:
            parts = torch.tensor(indices, dtype=torch.long).tensor_split(self.chunks)[::-1]
            for k, part in enumerate(parts):
                yield part.tolist() + [_Draw(k, self.chunks)]


class _WithDraws(Dataset):
    """The train dataset, through which a `_Draw` passes unchanged to the collator."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return index if isinstance(index, _Draw) else self.dataset[index]


class _CollateWithDraw:
    """Collates the examples of a micro-batch and files its `_Draw` under `_DRAW_KEY` (an empty
    micro-batch is the `_Draw` alone)."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, items: list) -> dict:
        *examples, draw = items
        batch = self.collate(examples) if examples else {}
        if not isinstance(batch, Mapping):
            raise DPCompileError(f"DPTrainer: the data collator returned a {type(batch).__name__}; it must return a "
                                 "dict of model inputs (the Trainer calls model(**batch))")
        batch = dict(batch)
        batch[_DRAW_KEY] = draw
        return batch


class _PrivacyCallback(transformers.TrainerCallback):
    """Logs ε at the end of every epoch and writes the privacy state into every checkpoint."""

    def __init__(self, trainer: "DPTrainer") -> None:
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        logged_now = state.log_history and state.log_history[-1].get("step") == state.global_step
        if args.logging_strategy != "no" and not logged_now:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_privacy_state(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control


class DPTrainer(transformers.Trainer):
    """A `transformers.Trainer` that trains `model` with DP-SGD (see the module docstring).

    Args:
        model: the Hugging Face model (an ``nn.Module`` called with the collated batch as keywords).
        args: the TrainingArguments. ``per_device_train_batch_size × gradient_accumulation_steps`` is
            the expected logical batch B (q = B / N); ``max_steps`` or ``num_train_epochs`` (an epoch
            being round(N / B) steps) the planned steps σ is calibrated for.
        target_epsilon: ε to reach at the end of the planned steps; or give ``noise_multiplier``.
        noise_multiplier: σ itself (0: no noise, no ε claimed; for tests only).
        target_delta: δ; default 1 / N^1.1.
        max_grad_norm: the per-sample clipping bound R; default ``args.max_grad_norm``. The Trainer's
            own clipping of the summed (noisy) gradient is off: per-sample clipping replaces it.
        accountant: "pld" or "rdp" (dp-accounting).
        secret_dir: where the secret part of the privacy state is saved, one file per checkpoint;
            default ``<output_dir>-dpcompile-secret``, beside the output directory (which may be
            pushed to the Hub) and readable only by its owner.
        dry_run: run one private trial step of a copy of the model on two training examples at
            construction, so that what the compiler passes refuse surfaces before training.
        dp_options: further dp backend options (``strategy``, ``memory_budget_mb``, ...).
        **kwargs: the other Trainer arguments (train_dataset, data_collator, eval_dataset, callbacks, ...).
    """

    def __init__(self, model: torch.nn.Module, args: "transformers.TrainingArguments", *,
                 target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 target_delta: float | None = None, max_grad_norm: float | None = None, accountant: str = "pld",
                 secret_dir: str | None = None, dry_run: bool = True, dp_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("model_init") is not None:
            raise DPCompileError("DPTrainer: model_init is not supported (the Trainer would build a new model that "
                                 "the privacy state does not protect); pass model=")
        super().__init__(model=model, args=args, **kwargs)
        self._refuse_unsupported_setup()
        self._causal = type(self.model).__name__ in _causal_lm_names()
        self._check_model(dry_run)
        n = len(self.train_dataset)
        chunks = self.args.gradient_accumulation_steps
        expected_batch = self.args.per_device_train_batch_size * chunks
        if expected_batch > n:
            raise DPCompileError(f"DPTrainer: the expected logical batch per_device_train_batch_size × "
                                 f"gradient_accumulation_steps = {expected_batch} exceeds the {n} training examples")
        self.sample_rate = expected_batch / n
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        self.planned_steps = (self.args.max_steps if self.args.max_steps > 0
                              else math.ceil(self.args.num_train_epochs * self.steps_per_epoch))
        self.target_delta = n ** -1.1 if target_delta is None else float(target_delta)
        sigma = self._noise_multiplier(target_epsilon, noise_multiplier, accountant)
        R = self.args.max_grad_norm if max_grad_norm is None else max_grad_norm
        if not R or R <= 0:
            raise DPCompileError(f"DPTrainer: max_grad_norm (the per-sample clipping bound) must be > 0, got {R!r}")
        fixed = sorted(set(dp_options or {}) & {"max_grad_norm", "noise_multiplier", "sample_rate", "accountant",
                                                 "expected_batch_size", "dataset_size", "noise_mechanism"})
        if fixed:
            raise DPCompileError(f"DPTrainer: dp_options {fixed} are set by the DPTrainer from its own arguments and "
                                 "the TrainingArguments (noise_mechanism: only Gaussian DP-SGD with Poisson sampling)")
        options = dict(dp_options or {}, max_grad_norm=float(R), noise_multiplier=sigma,
                       sample_rate=self.sample_rate, expected_batch_size=self.sample_rate * n, accountant=accountant)
        self.privacy = register_state(options, self.model)
        self.privacy.sampling_audit = None  # the DPTrainer's loader draws the Poisson batches itself
        self.private_model = torch.compile(self.model, backend="dp", options=options)
        self._draws = _PoissonMicroBatches(n, self.sample_rate, self.steps_per_epoch, chunks, self.privacy)
        self.secret_dir = secret_dir or os.path.abspath(self.args.output_dir).rstrip(os.sep) + "-dpcompile-secret"
        self.add_callback(_PrivacyCallback(self))

    # -- set-up ------------------------------------------------------------------------------
    def _refuse_unsupported_setup(self) -> None:
        args = self.args

        def refuse(what: str) -> None:
            raise DPCompileError(f"DPTrainer: {what}")

        if args.world_size > 1 or args.n_gpu > 1:
            refuse("training on several processes or GPUs is not supported (Poisson draws and the noise are made "
                   "for one process); run on one device, or use dpcompile.make_private with torch.distributed")
        if args.fp16:
            refuse("fp16 scales the loss with a GradScaler outside the dp graphs; use bf16 or float32")
        if args.torch_compile:
            refuse("torch_compile=True would compile the model with another backend; leave it off (the DPTrainer "
                   "compiles the model with backend 'dp' itself)")
        if self.train_dataset is None or isinstance(self.train_dataset, IterableDataset) \
                or not hasattr(self.train_dataset, "__len__"):
            refuse("needs a train_dataset with __len__ and __getitem__: Poisson sampling draws each record by index")

    def _noise_multiplier(self, target_epsilon: float | None, noise_multiplier: float | None, accountant: str) -> float:
        if (target_epsilon is None) == (noise_multiplier is None):
            raise DPCompileError("DPTrainer: pass exactly one of target_epsilon or noise_multiplier")
        if noise_multiplier is not None:
            return float(noise_multiplier)
        return calibrate_noise_multiplier(target_epsilon, self.target_delta, self.sample_rate, self.planned_steps,
                                          mechanism=accountant)

    def _check_model(self, dry_run: bool) -> None:
        """Refusals before anything trains: the module rules of `dpcompile.check`, then with `dry_run`
        one private step of a copy of the model on two training examples, the loss computed as in
        training (noise off; the copy and its gradients are thrown away, nothing reaches the model)."""
        report = check(self.model)
        if not report.ok:
            raise DPCompileError(f"DPTrainer: {type(self.model).__name__} cannot be trained privately as it is; "
                                 f"nothing was trained.\n{report}")
        if not dry_run or len(self.train_dataset) < 2:
            return
        from ..tools.inspection import capture_graphs

        batch = self._prepare_inputs(self._collator()([self.train_dataset[0], self.train_dataset[1]]))
        trial = copy.deepcopy(self.model).train()
        compiled = torch.compile(trial, backend="dp", options={"noise_multiplier": 0.0})
        try:
            with capture_graphs(snapshots=False, skip_inductor=True):  # graphs run as Python: no kernel build
                self._loss(compiled, batch).backward()
        except DPCompileError as refusal:
            raise DPCompileError(f"DPTrainer: a private trial step of {type(self.model).__name__} on two training "
                                 f"examples was refused; nothing was trained.\n{refusal}") from None
        finally:
            torch._dynamo.reset()

    def _collator(self) -> Callable:
        return self._get_collator_with_removed_columns(self.data_collator, description="training")

    # -- data --------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """Poisson draws of rate q, each as `gradient_accumulation_steps` micro-batches (not a shuffled
        fixed-size loader: the accounting assumes Poisson sampling)."""
        dataset, collate = self.train_dataset, self._collator()
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
                collate = self.data_collator
        except ImportError:
            pass
        return DataLoader(_WithDraws(dataset), batch_sampler=self._draws, collate_fn=_CollateWithDraw(collate),
                          num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    # -- one micro-batch -----------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and dp backward of one micro-batch of a Poisson draw; the last one releases the
        noisy gradient (an empty draw: noise only). Returns the loss share for the Trainer's log."""
        draw = inputs.pop(_DRAW_KEY, None)
        if not isinstance(draw, _Draw):
            raise DPCompileError("DPTrainer: a training batch that its own Poisson loader did not draw reached "
                                 "training_step (get_train_dataloader was replaced?); nothing was released")
        if draw.last != self.accelerator.sync_gradients:
            raise DPCompileError(
                f"DPTrainer: micro-batch {draw.chunk + 1} of {draw.chunks} of a Poisson draw came "
                f"{'with' if self.accelerator.sync_gradients else 'without'} the Trainer's optimizer step: its "
                "gradient accumulation does not follow the draws, so a release would not be one Poisson batch; "
                "nothing was released")
        state = self.privacy
        if draw.chunk == 0:
            state.discard_accumulation()  # a draw abandoned half-way is never released
        zero = torch.zeros((), device=self.args.device)
        if not inputs:  # no sample in this micro-batch (the largest comes last: the whole draw was empty)
            if draw.last:
                release_pure_noise(state, [p for p in self.model.parameters() if p.requires_grad])
            return zero
        model.train()
        inputs = self._prepare_inputs(inputs)
        for value in inputs.values():  # Poisson batch sizes vary: one graph with a symbolic batch dim
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        state.release_next = draw.last
        try:
            loss = self.compute_loss(model, inputs)
            loss.backward()
        finally:
            state.release_next = True
        return loss.detach() / draw.chunks

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """The mean over the batch of each sample's own loss (`per_sample_loss`, or the Trainer's
        ``compute_loss_func``); with grad enabled through the dp-compiled model."""
        if torch.is_grad_enabled():
            if self.accelerator.unwrap_model(model) is not self.model:
                raise DPCompileError("DPTrainer: training a model other than the one the privacy state protects")
            model = self.private_model
        # else evaluation: the plain model (no gradient, nothing released)
        return self._loss(model, inputs, return_outputs)

    def _loss(self, model: Callable, inputs: dict[str, Any], return_outputs: bool = False):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        if labels is None:  # the model computes its loss (checked by the dp backend)
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        elif self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        else:
            loss = self.per_sample_loss(outputs, labels)
        return (loss, outputs) if return_outputs else loss

    def per_sample_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of per-sample losses from the logits: each sequence's token mean over its
        own labelled tokens (-100 ignored; shifted by one for causal LMs), a sample's cross-entropy for
        classification, its squared error for regression (one output). Override for other tasks."""
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        smoothing = self.args.label_smoothing_factor
        if labels.dim() >= 2 and logits.dim() == labels.dim() + 1:  # one class score vector per token
            if self._causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            per_token = F.cross_entropy(logits.movedim(-1, 1), labels, reduction="none", label_smoothing=smoothing)
            counted = (labels != -100).flatten(1).sum(1).clamp(min=1)
            return (per_token.flatten(1).sum(1) / counted).mean()
        if labels.dim() == 1 and logits.dim() == 2:
            if logits.shape[1] == 1 and labels.is_floating_point():
                return F.mse_loss(logits.squeeze(1), labels)
            return F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if labels.shape == logits.shape and labels.is_floating_point():  # multi-label: equal terms per sample
            return F.binary_cross_entropy_with_logits(logits, labels)
        raise DPCompileError(f"DPTrainer: no per-sample loss for logits of shape {tuple(logits.shape)} and labels of "
                             f"shape {tuple(labels.shape)}; override DPTrainer.per_sample_loss or pass "
                             "compute_loss_func= (a mean over the batch of each sample's own loss)")

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        """No clipping of the released gradient: each sample's was clipped inside the dp graphs."""
        return None

    # -- logs ----------------------------------------------------------------------------------
    def privacy_metrics(self) -> dict[str, float]:
        """ε at `target_delta` so far, σ and the number of private steps (releases, empty draws included)."""
        return {"epsilon": self.privacy.epsilon(self.target_delta), "sigma": self.privacy.options.noise_multiplier,
                "dp_steps": self.privacy.steps}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log({**logs, **self.privacy_metrics()}, *args, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _secret_path(self, checkpoint: str) -> str:
        return os.path.join(self.secret_dir, os.path.basename(os.path.normpath(checkpoint)) + ".pt")

    def save_privacy_state(self, checkpoint: str) -> None:
        """The public part into `checkpoint` (``dpcompile_privacy.json``), the secret part into
        ``secret_dir`` (owner-only), and the secret files of checkpoints the Trainer deleted go too."""
        if not os.path.isdir(checkpoint):
            raise DPCompileError(f"DPTrainer: the checkpoint folder {checkpoint} does not exist; its privacy state "
                                 "could not be saved with it (a resume from it will be refused)")
        with open(os.path.join(checkpoint, PUBLIC_STATE_FILE), "w") as f:
            json.dump(self.privacy.state_dict(), f, indent=1)
        os.makedirs(self.secret_dir, mode=0o700, exist_ok=True)
        descriptor = os.open(self._secret_path(checkpoint), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            torch.save(self.privacy.secret_state_dict(), f)
        self._forget_deleted_checkpoints(os.path.dirname(os.path.normpath(checkpoint)))

    def _forget_deleted_checkpoints(self, output_dir: str) -> None:
        for name in os.listdir(self.secret_dir):
            stem = name.removesuffix(".pt")
            if stem.startswith(PREFIX_CHECKPOINT_DIR) and not os.path.isdir(os.path.join(output_dir, stem)):
                os.remove(os.path.join(self.secret_dir, name))

    def load_privacy_state(self, checkpoint: str) -> None:
        """Restore both parts saved with `checkpoint`; refused if one is missing or does not match it."""
        public_path, secret_path = os.path.join(checkpoint, PUBLIC_STATE_FILE), self._secret_path(checkpoint)
        for path, part in ((public_path, "public"), (secret_path, "secret")):
            if not os.path.isfile(path):
                raise DPCompileError(
                    f"DPTrainer: cannot resume from {checkpoint}: its {part} privacy state {path} is missing (a "
                    "checkpoint not saved by DPTrainer, or secret_dir differs from the run that saved it). Without "
                    "it the accounting would restart at step 0 and under-report ε; nothing was trained")
        with open(public_path) as f:
            public = json.load(f)
        trainer_state = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if os.path.isfile(trainer_state):
            with open(trainer_state) as f:
                global_step = json.load(f).get("global_step")
            if global_step != public.get("steps"):
                raise DPCompileError(
                    f"DPTrainer: {public_path} is at private step {public.get('steps')} but the checkpoint at "
                    f"Trainer step {global_step}: the privacy state belongs to another checkpoint; nothing was trained")
        self.privacy.load_state_dict(public)
        self.privacy.load_secret_state_dict(torch.load(secret_path, weights_only=True))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; a resume first restores the privacy state saved with the checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.load_privacy_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)


def _causal_lm_names() -> set[str]:
    """Class names of the causal LMs, whose labels are the inputs (shifted by one for the loss)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
