"""Typed experiment configuration.

One :class:`ExperimentConfig` describes a whole federated run: the data and how it
is split into sites, the model, local training, differential privacy, the
aggregation strategy and the server's round loop. It is validated once, at load
time; every later stage receives typed, checked values.

Every field is a scalar (``bool``, ``int``, ``float`` or ``str``) so that the
whole config can travel as a flat Flower *run config* (``"train.lr": 0.05``) and
be overridden with ``flwr run . --run-config`` as well as ``medfed simulate --set``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which dataset, where it lives, and how it is split into sites."""

    dataset: str = Field("synthetic", description="Dataset name (see federation.data.available_datasets()).")
    data_dir: str = Field(
        "",
        description="Folder holding dataset files. Empty: $MEDFED_DATA_DIR, else ~/.medfed/data.",
    )
    download: bool = Field(False, description="Download missing MedMNIST files with the medmnist package.")
    num_sites: int = Field(3, ge=1, le=1000, description="Number of hospitals the data is split into.")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="How labels are spread over sites.")
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (partition=dirichlet).")
    min_site_size: int = Field(2, ge=1, description="Smallest number of training samples a site may hold.")
    max_train_samples: int = Field(0, ge=0, description="Cap on the pooled training set (0 = all).")
    max_test_samples: int = Field(0, ge=0, description="Cap on the pooled test set (0 = all).")
    num_samples: int = Field(1200, ge=8, description="Synthetic dataset only: total images generated.")
    image_size: int = Field(28, ge=8, le=1024, description="Side length the images are given to the model at.")
    dicom_labels: str = Field("labels.csv", description="dicom: labels CSV, relative to data_dir or absolute.")
    dicom_key_column: str = Field("sop_instance_uid", description="dicom: CSV column with SOP Instance UID or relative path.")
    dicom_label_column: str = Field("label", description="dicom: CSV column holding the class.")
    dicom_modalities: str = Field("", description="dicom: allowed modalities, comma separated (empty = all).")
    dicom_label_names: str = Field("", description="dicom: class names in index order, comma separated (empty = inferred).")
    dicom_frames: Literal["first", "middle", "all"] = Field("first", description="dicom: frames used of multi-frame files.")
    dicom_channels: int = Field(0, ge=0, le=3, description="dicom: 0 = auto, 1 or 3.")
    dicom_normalize: Literal["auto", "range", "minmax"] = Field("auto", description="dicom: intensity scaling to [0, 1].")
    dicom_cache_dir: str = Field("", description="dicom: header index folder (empty = inside data_dir).")
    dicom_test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="dicom: patients held out as the local test split.")


class ModelConfig(_Section):
    """Which network to train (a name from the model registry) and its size."""

    name: str = Field("cnn", description="Model name (see federation.models.available_models()).")
    norm: Literal["group", "instance", "batch"] = Field(
        "group", description="Normalization layers; 'batch' is refused when privacy is enabled."
    )
    width: int = Field(16, ge=1, le=512, description="Channels of the first block (cnn only).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")


class TrainConfig(_Section):
    """Local training at each site, per round."""

    local_epochs: float = Field(1.0, gt=0.0, description="Passes over the site's data per round (may be fractional).")
    batch_size: int = Field(32, ge=1, description="Expected batch size (Poisson-sampled under DP).")
    lr: float = Field(0.05, gt=0.0, description="Local learning rate.")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    amp: bool = Field(True, description="bf16 mixed precision on CUDA for non-DP training.")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per site (0 = leave torch's default).")


class PrivacyConfig(_Section):
    """Site-side differential privacy with Opacus DP-SGD."""

    enabled: bool = True
    target_epsilon: float = Field(
        8.0, gt=0.0, description="Budget for the whole planned run; sets the noise when noise_multiplier=0."
    )
    target_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    noise_multiplier: float = Field(0.0, ge=0.0, description=">0: use this noise and stop at target_epsilon.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-sample gradient clipping bound.")
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    grad_sample_mode: Literal["hooks", "ew", "functorch"] = "hooks"


class StrategyConfig(_Section):
    """Aggregation strategy (a name from the strategy registry) and its parameters.

    Each strategy reads the parameters it understands and ignores the others.
    """

    name: str = Field("fedavg", description="Strategy name (see strategies.available_strategies()).")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_sites: int = Field(2, ge=1, description="Quorum: fewest successful site replies a round may aggregate.")
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal term.")
    server_lr: float = Field(1.0, gt=0.0, description="FedAvgM server learning rate.")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="FedAvgM momentum.")
    eta: float = Field(0.01, gt=0.0, description="FedOpt (Adam/Yogi/Adagrad) server learning rate.")
    eta_l: float = Field(0.0316, gt=0.0, description="FedOpt client learning rate (logged only).")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0, description="FedOpt adaptivity.")
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="FedTrimmedAvg fraction cut at each end.")
    num_malicious: int = Field(0, ge=0, description="Krum/MultiKrum/Bulyan: assumed malicious sites.")
    num_to_keep: int = Field(0, ge=0, description="MultiKrum: updates averaged (0 = n - f).")


class ServerConfig(_Section):
    """The coordinator's round loop, evaluation and outputs."""

    rounds: int = Field(5, ge=1, le=100000)
    central_eval: bool = Field(True, description="Evaluate the global model on the pooled test split each round.")
    out_dir: str = Field("runs", description="Folder that receives one run directory per run.")
    run_name: str = Field("", description="Run directory name (empty: <name>-<timestamp>).")
    resume: str = Field("", description="Run directory to continue from its last completed round.")
    keep_checkpoints: int = Field(0, ge=0, description="Round checkpoints kept (0 = all).")
    round_timeout: float = Field(3600.0, gt=0.0, description="Seconds to wait for site replies.")


class SimulationConfig(_Section):
    """Resources for the local simulation engine (ignored in deployment)."""

    cpus_per_site: float = Field(1.0, gt=0.0)
    gpus_per_site: float = Field(0.0, ge=0.0)


class ExperimentConfig(_Section):
    """A complete, validated medfed run description."""

    name: str = Field("medfed", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (letters, digits, _ . -).")
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
