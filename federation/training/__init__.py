"""Framework-independent local training and evaluation (no Flower imports).

Example::

    from federation.training import evaluate, model_state, train_local

    result = train_local(model=model, dataset=train_set, config=cfg.train,
                         privacy=privacy, seed=seed, proximal_mu=mu)
    weights = model_state(model)            # CPU tensors, no Opacus "_module." keys
    scores = evaluate(model=model, dataset=val_set).metrics()

Names are imported from their submodule on first use (:mod:`federation._lazy`):
evaluation does not load Opacus, which only :func:`train_local` needs.
"""

from federation._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "federation.training.batches": ("split_batch",),
        "federation.training.device": ("seed_everything", "select_device", "set_threads", "use_amp"),
        "federation.training.evaluate": ("evaluate",),
        "federation.training.local": ("model_state", "train_local"),
        "federation.training.results": ("EvalResult", "TrainResult"),
    },
)
