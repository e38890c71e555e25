"""Framework-independent local training and evaluation (no Flower imports).

Example::

    from federation.training import evaluate, model_state, train_local

    result = train_local(model=model, dataset=train_set, config=cfg.train,
                         privacy=privacy, seed=seed, proximal_mu=mu)
    weights = model_state(model)            # CPU tensors, no Opacus "_module." keys
    scores = evaluate(model=model, dataset=val_set).metrics()
"""

from federation.training.device import seed_everything, select_device, set_threads, use_amp
from federation.training.evaluate import evaluate
from federation.training.local import model_state, split_batch, train_local
from federation.training.results import EvalResult, TrainResult

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "model_state",
    "seed_everything",
    "select_device",
    "set_threads",
    "split_batch",
    "train_local",
    "use_amp",
]
