"""The one local training loop for the multi-task trunk/head model.

Used by the FLARE executor (one call per round), by the single-partner baseline and by the
benchmarks, so the federated and single-partner numbers come from identical training code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from pharmafl.core.errors import InputError
from pharmafl.core.metrics import per_task_auc, regression_metrics, summarize
from pharmafl.core.progress import StepCallback
from pharmafl.multitask.conformal import conformal_summary
from pharmafl.multitask.dataset import CENSOR_ABOVE, CENSOR_BELOW, CENSOR_EXACT, SiteData
from pharmafl.multitask.model import MultiTaskNet, TrunkConfig
from pharmafl.privacy.dp_sgd import DPConfig, GhostClipper, PrivacyBudget


@dataclass
class TrainConfig:
    """Local training hyperparameters: the executor's ``training`` argument, the baseline's settings."""

    dropout: float = 0.2
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    local_epochs: int = 1
    validation_fold: int = 1
    seed: int = 0
    # Weight of the censored-MSE regression loss on the partner's regression tasks (standardised pChEMBL
    # values) next to the classification loss; 0 (default) trains no regression head.
    regression_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.local_epochs <= 0:
            raise ValueError("batch_size and local_epochs must be positive")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not (math.isfinite(self.regression_weight) and self.regression_weight >= 0):
            raise ValueError(f"regression_weight must be a finite number >= 0, got {self.regression_weight}")


#: the setting groups of a multi-task job's executor (``training: {...}``, ``trunk: {...}``, ``dp: {...}``)
SETTINGS = {"training": TrainConfig, "trunk": TrunkConfig, "dp": DPConfig}


def sparse_batch(X: sparse.csr_matrix, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag inputs (flat on-bit indices, per-row offsets) for the given rows."""
    block = X[rows]
    indices = torch.from_numpy(block.indices.astype(np.int64))
    offsets = torch.from_numpy(block.indptr[:-1].astype(np.int64))
    return indices, offsets


@torch.no_grad()
def predict_probabilities(
    model: MultiTaskNet, X: sparse.csr_matrix, rows: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Active probabilities (rows x tasks) of ``model`` on rows of ``X``, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        indices, offsets = sparse_batch(X, rows[start : start + batch_size])
        out.append(torch.sigmoid(model(indices, offsets)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), dtype=np.float32)


@torch.no_grad()
def predict_values(model: MultiTaskNet, X: sparse.csr_matrix, rows: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Regression predictions (rows x regression tasks, in each task's units) of ``model``, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        indices, offsets = sparse_batch(X, rows[start : start + batch_size])
        out.append(model.regression_head(model.trunk(indices, offsets)).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.regression_head.linear.out_features), dtype=np.float32)


class _Optimizers:
    """Several optimizers stepped as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def make_optimizer(model: MultiTaskNet, config: TrainConfig, private: bool = False) -> _Optimizers:
    """Adam, lazily on the sparse input layer (only the rows of bits present in a batch are updated:
    4x faster than dense Adam over 32k x hidden at the same accuracy) and densely elsewhere.
    ``weight_decay`` applies to the dense layers. Under DP-SGD (``private``) every row gets noise in every step,
    so the input layer's gradient is dense and one dense Adam steps everything."""
    if private:
        sparse_ids = {id(model.trunk.input.weight)}
        return _Optimizers(
            torch.optim.Adam(
                [
                    {"params": [model.trunk.input.weight], "weight_decay": 0.0},
                    {"params": [p for p in model.parameters() if id(p) not in sparse_ids]},
                ],
                lr=config.learning_rate,
                weight_decay=config.weight_decay,
            )
        )
    sparse_params = [p for p in model.parameters() if p is model.trunk.input.weight]
    dense_params = [p for p in model.parameters() if p is not model.trunk.input.weight]
    return _Optimizers(
        torch.optim.SparseAdam(sparse_params, lr=config.learning_rate),
        torch.optim.Adam(dense_params, lr=config.learning_rate, weight_decay=config.weight_decay),
    )


class MultiTaskTrainer:
    """Holds one partner's model and optimizer; trains epochs and evaluates folds."""

    def __init__(self, data: SiteData, config: TrainConfig, trunk: TrunkConfig, dp: DPConfig | None = None):
        if trunk.n_features != data.n_features:
            raise InputError(
                f"the trunk expects {trunk.n_features} fingerprint bits but the data at {data.path} has "
                f"{data.n_features}; prepare the data with --bits {trunk.n_features} or change the job's trunk"
            )
        self.data = data
        self.config = config
        test_fold = int(data.manifest.get("test_fold", 0))
        if config.validation_fold == test_fold:
            raise ValueError(f"validation_fold {config.validation_fold} is the test fold; pick another fold")
        self.test_fold = test_fold
        self.train_rows = np.setdiff1d(
            data.rows_in_folds(f for f in np.unique(data.folds) if f not in (test_fold, config.validation_fold)),
            data.audit_rows,  # the audit hold-out: never trained on (``prepare chem --audit-fraction``)
        )
        if len(self.train_rows) == 0:
            raise ValueError(f"site at {data.path} has no training compounds outside the test/validation folds")
        torch.manual_seed(config.seed)
        # a partner without regression tasks (binary assays only) trains no regression head, whatever the weight
        has_tasks = data.regression is not None and data.regression.n_tasks > 0
        self.regression = data.regression if config.regression_weight > 0 and has_tasks else None
        self.model = MultiTaskNet(
            data.n_features,
            data.n_tasks,
            trunk.hidden_sizes,
            config.dropout,
            self.regression.n_tasks if self.regression else 0,
        )
        if self.regression:
            self._standardise_regression_targets()
        self.dp = dp if dp is not None and dp.enabled else None
        self.clipper, self.budget = None, None
        if self.dp:
            if self.regression:
                raise InputError("DP-SGD does not train the regression head yet; set regression_weight to 0.")
            self.clipper = GhostClipper(self.model, self.dp, {self.model.trunk.input: self.model.trunk.input_bias})
            self.budget = PrivacyBudget(self.dp, len(self.train_rows), config.batch_size)
        self.optimizer = make_optimizer(self.model, config, private=self.dp is not None)
        self.rng = np.random.default_rng(config.seed)
        # Dropout draws from torch's global generator: keep this trainer's own stream of it, so a
        # trainer's result does not depend on what other trainers in the process did in between.
        self.torch_rng_state = torch.get_rng_state()
        self.epochs_done = 0

    def train(
        self,
        epochs: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress: StepCallback | None = None,
    ) -> int:
        """Train ``epochs`` epochs (default: config.local_epochs) over the training folds; returns steps.

        ``progress(done, total, loss)`` is called after every step."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.torch_rng_state)
            steps = self._train(epochs or self.config.local_epochs, should_stop, progress)
            self.torch_rng_state = torch.get_rng_state()
        return steps

    def _train(self, epochs: int, should_stop: Callable[[], bool], progress: StepCallback | None) -> int:
        if self.budget is not None:
            return self._train_private(epochs, should_stop, progress)
        self.model.train()
        steps = 0
        labels = self.data.Y
        total = epochs * math.ceil(len(self.train_rows) / self.config.batch_size)
        for _ in range(epochs):
            order = self.rng.permutation(self.train_rows)
            for start in range(0, len(order), self.config.batch_size):
                if should_stop():
                    return steps
                rows = order[start : start + self.config.batch_size]
                indices, offsets = sparse_batch(self.data.X, rows)
                y = torch.from_numpy(labels[rows].toarray().astype(np.float32))
                observed = y != 0
                hidden = self.model.trunk(indices, offsets)
                logits = self.model.head(hidden)
                # BCE on observed labels only: unmeasured compound/task pairs carry no signal.
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[observed], (y[observed] > 0).float())
                if self.regression:
                    loss = loss + self.config.regression_weight * self._censored_mse(hidden, rows)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                steps += 1
                if progress:
                    progress(steps, total, float(loss.detach()))
            self.epochs_done += 1
        return steps

    def _train_private(self, epochs: int, should_stop: Callable[[], bool], progress: StepCallback | None) -> int:
        """DP-SGD: Poisson-sampled batches (about ``batch_size``), each compound's gradient clipped, noise added; stops
        when the privacy budget is spent."""
        self.model.train()
        steps, budget = 0, self.budget
        total = epochs * budget.steps_per_epoch
        for _ in range(epochs):
            for rows in budget.poisson_batches(self.train_rows, self.rng, budget.steps_per_epoch):
                if should_stop() or budget.exhausted:
                    return steps
                loss = self.clipper.step(
                    lambda rows=rows: self.per_compound_losses(rows),
                    self.optimizer,
                    budget.expected_batch_size,
                    budget.noise_multiplier,
                )
                budget.steps += 1
                steps += 1
                if progress:
                    progress(steps, total, loss)
            self.epochs_done += 1
        return steps

    def per_compound_losses(self, rows: np.ndarray) -> torch.Tensor:
        """Each compound's mean BCE over its observed labels: the loss of one record, the DP privacy unit."""
        if len(rows) == 0:
            return torch.zeros(0)
        indices, offsets = sparse_batch(self.data.X, rows)
        y = torch.from_numpy(self.data.Y[rows].toarray().astype(np.float32))
        observed = (y != 0).float()
        logits = self.model(indices, offsets)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (y > 0).float(), reduction="none")
        return (bce * observed).sum(1) / observed.sum(1).clamp(min=1)

    def _standardise_regression_targets(self) -> None:
        """Each regression task's mean and std over its measured training values (bounds included when a task
        has fewer than two measurements), so that every task weighs alike in the loss."""
        values = self.regression.values[self.train_rows].tocsc()
        censor = self.regression.censor[self.train_rows].tocsc()
        mean, std = np.zeros(self.regression.n_tasks), np.ones(self.regression.n_tasks)
        for task in range(self.regression.n_tasks):
            start, end = values.indptr[task], values.indptr[task + 1]
            column, codes = values.data[start:end], censor.data[start:end]
            measured = column[codes == CENSOR_EXACT] if (codes == CENSOR_EXACT).sum() >= 2 else column
            if len(measured):
                mean[task] = float(np.mean(measured))
                std[task] = float(np.std(measured)) if len(measured) >= 2 and np.std(measured) > 0 else 1.0
        head = self.model.regression_head
        head.mean.copy_(torch.as_tensor(mean, dtype=head.mean.dtype))
        head.std.copy_(torch.as_tensor(std, dtype=head.std.dtype))

    def _censored_mse(self, hidden: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Mean squared error in standard units over the batch's regression values; a ">" bound is only
        penalised when the prediction falls below it, a "<" bound when it rises above it."""
        censor = torch.from_numpy(self.regression.censor[rows].toarray())
        present = censor != 0
        if not present.any():
            return hidden.new_zeros(())
        head = self.model.regression_head
        target = (torch.from_numpy(self.regression.values[rows].toarray()) - head.mean) / head.std
        residual = head.standardised(hidden) - target
        residual = torch.where(censor == CENSOR_ABOVE, residual.clamp(max=0), residual)
        residual = torch.where(censor == CENSOR_BELOW, residual.clamp(min=0), residual)
        return residual[present].pow(2).mean()

    def evaluate_regression(self, rows: np.ndarray) -> dict:
        """Per evaluated regression task, R² and RMSE over the measured values in ``rows``; and their means."""
        predictions = predict_values(self.model, self.data.X, rows)
        values = self.regression.values[rows].toarray()
        measured = self.regression.censor[rows].toarray() == CENSOR_EXACT
        # the evaluation quorum of the preparation (measured values in the test fold), on the fold scored
        quorum = max(2, int(self.data.manifest.get("quorum", {}).get("min_eval_regression_values", 10)))
        per_task = {}
        for task in np.flatnonzero(self.regression.eval_task_mask):
            mask = measured[:, task]
            if mask.sum() < quorum:
                continue
            per_task[str(self.regression.tasks["task_id"].iloc[task])] = regression_metrics(
                values[mask, task], predictions[mask, task]
            )
        means = {
            name: float(np.mean([m[name] for m in per_task.values()])) if per_task else float("nan")
            for name in ("r2", "rmse")
        }
        return {**means, "tasks_evaluated": len(per_task), "per_task": per_task}

    @torch.no_grad()
    def predict(self, rows: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """Active probabilities (rows x tasks)."""
        return predict_probabilities(self.model, self.data.X, rows, batch_size)

    def evaluate(self, fold: int | None = None) -> dict:
        """Mean and per-task AUC-ROC / AUC-PR on one fold (default: the test fold)."""
        fold = self.test_fold if fold is None else fold
        rows = self.data.rows_in_folds([fold])
        # The evaluation quorum the data was prepared with, applied to the fold scored.
        quorum = self.data.manifest.get("quorum", {})
        scores = self.predict(rows)
        per_task = per_task_auc(
            self.data.Y[rows].toarray(),
            scores,
            list(self.data.tasks["task_id"]),
            quorum.get("min_eval_actives", 5),
            quorum.get("min_eval_inactives", 5),
        )
        # the task's training labels: MELLODDY's gains were largest for tasks with little data
        train_labels = np.asarray(self.data.Y[self.train_rows].getnnz(axis=0)).ravel()
        column = {task_id: i for i, task_id in enumerate(self.data.tasks["task_id"])}
        for task_id, metrics in per_task.items():
            metrics["train_labels"] = int(train_labels[column[task_id]])
        result = {**summarize(per_task), "per_task": per_task}
        if self.regression:
            result["regression"] = self.evaluate_regression(rows)
        if fold == self.test_fold:  # conformal sets on the test fold, calibrated on the validation fold
            calibration = self.data.rows_in_folds([self.config.validation_fold])
            result["conformal"] = conformal_summary(
                (self.data.Y[calibration].toarray(), self.predict(calibration)),
                (self.data.Y[rows].toarray(), scores),
            )
        return result

    def trunk_weights(self) -> dict[str, np.ndarray]:
        return self.model.trunk_state()

    def load_trunk(self, weights: Mapping[str, np.ndarray]) -> None:
        self.model.load_trunk(weights)

    def head_state(self) -> dict[str, torch.Tensor]:
        return self.model.head_state()

    @property
    def regression_task_ids(self) -> list[str]:
        return list(self.regression.tasks["task_id"]) if self.regression else []

    def load_head(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = self.model.load_state_dict(dict(state), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"unexpected head keys {missing.unexpected_keys}")
