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

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    partition: Literal["iid", "dirichlet", "quantity", "natural"] = Field(
        "iid",
        description="How samples are spread over sites: iid, dirichlet (label skew), quantity (size skew), "
        "natural (the dataset's real hospitals, e.g. heart_disease).",
    )
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (partition=dirichlet).")
    quantity_fractions: str = Field(
        "", description="partition=quantity: relative site sizes, comma separated (empty = power law)."
    )
    quantity_exponent: float = Field(
        1.0, ge=0.0, description="partition=quantity without fractions: site k gets a share ~ k^-exponent."
    )
    site_shift: Literal["default", "none", "acquisition"] = Field(
        "default",
        description="Per-site feature shift: default (the dataset's own, synthetic only), none, or "
        "acquisition (MONAI scanner profiles for any image dataset).",
    )
    shift_strength: float = Field(0.5, ge=0.0, le=2.0, description="site_shift=acquisition: 0 none, 0.5 clear, 1 strong.")
    shift_components: str = Field(
        "all", description="site_shift=acquisition: blur,downsample,gamma,contrast,bias,noise (comma list) or all."
    )
    min_site_size: int = Field(2, ge=1, description="Smallest number of training samples a site may hold.")
    public_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of the pooled training images declared public: held out of every "
        "site, for central pretraining (medfed pretrain)."
    )
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
    dicom_patient_salt_file: str = Field(
        "", description="dicom: file with the secret salt of the PatientID keys (empty = plain hash); a real site "
        "always uses its own, in its state-dir.",
    )
    task: str = Field(
        "classification", description="What the model learns: classification or segmentation (see federation.tasks)."
    )
    volume_shape: str = Field(
        "", description="NIfTI segmentation data: D,H,W every volume is padded/cropped to (empty = the dataset's default)."
    )
    nifti_label_names: str = Field(
        "", description="nifti: mask class names in label order, comma separated (empty = the folder's dataset.json)."
    )
    nifti_test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="msd_hippocampus/nifti: cases held out as the test split."
    )

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: str) -> str:
        from federation.tasks import check_task_name  # noqa: PLC0415 - keeps the schema free of the registry

        return check_task_name(value)  # raises ValueError listing the valid names

    @field_validator("volume_shape", mode="before")
    @classmethod
    def _check_volume_shape(cls, value: object) -> object:
        if isinstance(value, str) and value.strip():
            parse_volume_shape(value)
        return value


def parse_volume_shape(value: str) -> tuple[int, ...]:
    """Parse ``data.volume_shape`` (``"40,56,40"``) into three sides of at least 8 voxels.

    Raises:
        ValueError: Not three whole numbers >= 8.
    """
    try:
        shape = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"data.volume_shape must be D,H,W whole numbers, got {value!r}") from None
    if len(shape) != 3 or any(side < 8 or side > 512 for side in shape):
        raise ValueError(f"data.volume_shape must be three sides in [8, 512] (D,H,W), got {value!r}")
    return shape


class ModelConfig(_Section):
    """Which network to train (a name from the model registry) and its size."""

    name: str = Field("cnn", description="Model name (see federation.models.available_models()).")
    norm: Literal["group", "instance", "batch"] = Field(
        "group", description="Normalization layers; 'batch' is refused when privacy is enabled."
    )
    width: int = Field(16, ge=1, le=512, description="Channels of the first block (cnn only).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")
    init: str = Field(
        "", description="Round 0's weights: a state_dict file, a medfed run directory (its export/model_state.pt), a "
        "MONAI/torchvision checkpoint of the same net, or 'imagenet' (empty = random; federation.models.init)."
    )
    batchnorm: Literal["keep", "frozen", "group"] = Field(
        "keep", description="norm=batch: keep BatchNorm (no DP), or make it DP-compatible: 'frozen' folds the "
        "(pretrained) statistics into a frozen per-channel affine, 'group' GroupNorm with the BN affine."
    )


class TrainConfig(_Section):
    """Local training at each site, per round."""

    local_epochs: float = Field(1.0, gt=0.0, description="Passes over the site's data per round (may be fractional).")
    local_steps: int = Field(
        0, ge=0, description="Fixed optimizer steps per round at every site, whatever its size (0 = use local_epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Expected batch size (Poisson-sampled under DP).")
    lr: float = Field(0.05, gt=0.0, description="Local learning rate (of round 1 when lr_schedule decays it).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Local learning rate over the rounds: constant, or cosine decay to lr * lr_final."
    )
    lr_final: float = Field(0.1, ge=0.0, le=1.0, description="cosine: the last round's lr as a fraction of lr.")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    amp: bool = Field(True, description="bf16 mixed precision on CUDA for non-DP training.")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per site (0 = leave torch's default).")
    transfer_dtype: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="Update a site sends: fp32 weights, or its change quantized to fp16 / int8 (server decodes)."
    )
    trainable: str = Field(
        "all", description="Parameters that train: all, head, last-N (the last N stages and the head), or fnmatch "
        "patterns of parameter names, comma separated; the others stay frozen (and are not noised under DP)."
    )
    augment: str = Field(
        "none", description="On-the-fly augmentation at the site: none, light, strong, or registered transforms with "
        "parameters, e.g. 'flip(p=0.5),rotate90(p=0.5)' (federation.data.augment; image and mask together)."
    )
    local_norm: bool = Field(
        False, description="FedBN: norm-layer parameters stay at each site, never sent nor aggregated."
    )
    finetune_rounds: int = Field(
        0, ge=0, le=100, description="After the last round each site fine-tunes the final global model for this many "
        "local rounds (DP steps in its epsilon and ledger; the noise is calibrated for rounds + these) and reports "
        "personal-* metrics; the personal model stays at the site."
    )
    ditto_lambda: float = Field(
        0.0, ge=0.0, description="Ditto: > 0 makes each site also train a personal model every round, pulled towards "
        "the global one by lambda/2*||v - w||^2 (its DP steps in the site's epsilon: noise calibrated for 2*rounds); "
        "it stays at the site and is reported as personal-* metrics."
    )


class PrivacyConfig(_Section):
    """Site-side differential privacy with Opacus DP-SGD."""

    enabled: bool = True
    target_epsilon: float = Field(
        8.0, gt=0.0, description="Budget for the whole planned run; sets the noise when noise_multiplier=0."
    )
    target_delta: float = Field(
        1e-5, gt=0.0, lt=0.1, description="delta of every epsilon; a site also refuses delta above 1/n of its data."
    )
    noise_multiplier: float = Field(0.0, ge=0.0, description=">0: use this noise and stop at target_epsilon.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Per-sample gradient clipping bound.")
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    grad_sample_mode: Literal["auto", "ghost", "hooks", "ew", "functorch"] = Field(
        "auto",
        description="Per-sample clipping: ghost = medfed's mixed ghost clipping (fastest for cnn/resnet/densenet), "
        "hooks/ew/functorch = Opacus' per-sample gradients, auto = ghost when every layer supports it, else hooks.",
    )


class CentralDPConfig(_Section):
    """Central DP at the coordinator (strategies/central_dp.py): Flower's server-side
    fixed-clipping wrapper around fedavg/fedprox, site updates averaged uniformly,
    epsilon from an Opacus RDP accountant. Independent of the sites' DP-SGD (privacy.*).
    """

    enabled: bool = Field(False, description="Clip each site's update and add Gaussian noise to the average.")
    noise_multiplier: float = Field(1.0, gt=0.0, description="Noise std / clipping_norm, per sampled site.")
    clipping_norm: float = Field(1.0, gt=0.0, description="L2 bound on each site's model update.")
    target_delta: float = Field(1e-5, gt=0.0, lt=1.0, description="delta at which epsilon is reported.")


class SecAggConfig(_Section):
    """Secure aggregation (SecAgg+ on the Message API, strategies/secagg.py): the coordinator
    learns only the sum of the sites' updates, tolerating sites that drop out down to the threshold.
    """

    enabled: bool = Field(False, description="Mask every site's update so that the coordinator sees only their sum.")
    num_shares: int = Field(
        0, ge=0, description="Share holders per site secret, the site included (0 = every sampled site; "
        "else a sparse SecAgg+ graph, rounded down to an odd number >= 3)."
    )
    threshold: float = Field(
        0.67, gt=0.5, le=1.0,
        description="Fraction of a site's share holders needed to unmask (> 0.5; 1 = no dropout tolerated).",
    )
    clipping_range: float = Field(
        4.0, gt=0.0, description="Each element of a site's update (new minus global weights) is clipped to +-range."
    )
    quantization_bits: int = Field(20, ge=8, le=24, description="Quantized update elements are integers < 2^bits.")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="examples: weight by example count (only the total is revealed); uniform: each site once."
    )
    max_weight: int = Field(1_000_000, ge=1, le=10_000_000, description="Cap on a site's example-count weight.")


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
    central_eval: bool = Field(
        True, description="Evaluate the global model on the pooled test split each round (site-only data such as "
        "dicom: only with central_eval_dir)."
    )
    central_eval_dir: str = Field(
        "", description="Site-only data (dicom): the coordinator's own validation folder, every image of it "
        "evaluated centrally ('' = no central evaluation; the sites' evaluations are the run's metrics)."
    )
    eval_every: int = Field(
        1, ge=1, description="Evaluate (at the sites and centrally) every k-th round; the last round always."
    )
    out_dir: str = Field("runs", description="Folder that receives one run directory per run.")
    run_name: str = Field("", description="Run directory name (empty: <name>-<timestamp>).")
    resume: str = Field("", description="Run directory to continue from its last completed round.")
    keep_checkpoints: int = Field(0, ge=0, description="Round checkpoints kept (0 = all).")
    round_timeout: float = Field(3600.0, gt=0.0, description="Seconds to wait for site replies.")
    poll_interval: float = Field(
        0.5, ge=0.0, description="Deployment: seconds between pulls for site replies (0 = Flower's fixed 3 s)."
    )
    tracking: Literal["none", "mlflow", "tensorboard"] = Field(
        "none", description="Also log each round's metrics, ε per site and the config to MLflow or TensorBoard "
        "(in <run>/tracking/; pip install 'medfed[mlflow]' or 'medfed[tensorboard]')."
    )


class ClinicalConfig(_Section):
    """Clinical evaluation at each site: operating point, intervals, calibration, subgroups.

    Everything here is computed at the site from its own test split; only aggregate
    numbers leave it (see ``client/clinical_guard.py``).
    """

    threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="Operating point: predict positive when P(positive) >= threshold."
    )
    positive_class: int = Field(1, ge=0, description="Class index treated as 'positive' (the others are 'negative').")
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals (DeLong for AUC, Wilson otherwise)."
    )
    calibration_bins: int = Field(10, ge=2, le=20, description="Equal-width bins of the reliability diagram.")
    min_group_size: int = Field(
        10, ge=5, description="Subgroups (and reliability bins) smaller than this are never sent (floor 5)."
    )
    age_bands: str = Field(
        "18,40,65", description="Age band edges in years, comma separated, increasing (at most 7 edges)."
    )

    @field_validator("age_bands", mode="before")
    @classmethod
    def _check_age_bands(cls, value: object) -> str:
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # --set ...=18
        if isinstance(text, str):
            parse_age_edges(text)
        return text  # type: ignore[return-value]  (non-strings fail the str check with pydantic's message)


def parse_age_edges(value: str) -> tuple[int, ...]:
    """Parse ``clinical.age_bands`` (``"18,40,65"``) into increasing integer edges in ``[1, 150]``.

    Raises:
        ValueError: Not integers, not strictly increasing, out of range or more than 7 edges.
    """
    try:
        edges = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"clinical.age_bands must be whole years separated by commas, got {value!r}") from None
    if len(edges) > 7 or any(not 1 <= e <= 150 for e in edges) or list(edges) != sorted(set(edges)):
        raise ValueError(
            f"clinical.age_bands must be at most 7 strictly increasing whole years in [1, 150], got {value!r}"
        )
    return edges


class SimulationConfig(_Section):
    """Resources for the local simulation engine (ignored in deployment)."""

    cpus_per_site: float = Field(1.0, gt=0.0)
    gpus_per_site: float = Field(0.0, ge=0.0)
    site_policy: str = Field(
        "", description="Site policy YAML every simulated site obeys ('' = none); real sites use node config 'policy'."
    )
    site_state_dir: str = Field(
        "", description="Simulated sites' disks (ledger, audit log) ('' = <run dir>/site-state); real sites: 'state-dir'."
    )
    site_pacs: str = Field(
        "", description="PACS YAMLs of the simulated sites, comma separated, one per site in order: site k trains on "
        "the whole cohort of the k-th ('' = data.data_dir); real sites: node config 'pacs'."
    )
    data_cache_mb: int = Field(
        2048, ge=0, description="Site data kept per worker process between rounds, in MB (0 = reload every round)."
    )
    poll_interval: float = Field(
        0.01, ge=0.0, description="Seconds between the ServerApp's pulls for site replies (0 = Flower's 0.1 s)."
    )
    ray_address: str = Field(
        "",
        description="Run the simulated sites on this running Ray cluster ('host:port' of `ray start --head`, or "
        "'auto'); '' = start a local Ray. Every node needs this checkout, its venv and the data dir at the same paths.",
    )

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str) -> str:
        value = value.strip()
        if value in ("", "auto") or re.fullmatch(r"[A-Za-z0-9_.\-]+:\d{1,5}", value):
            return value
        raise ValueError(
            f"simulation.ray_address {value!r}: give the head node's 'host:port' (as printed by `ray start --head`), "
            "'auto' (the cluster this machine belongs to) or '' (a local Ray); Ray Client (ray://) is not supported"
        )


class FaultsConfig(_Section):
    """Simulated site faults (simulation only; a real site ignores this section)."""

    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Share of sites that fail each round (error reply).")
    straggler_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of sites that reply late each round.")
    straggler_delay: float = Field(1.0, ge=0.0, description="Seconds a late site waits before replying.")
    start_round: int = Field(1, ge=1, description="First round with faults.")


class AttackConfig(_Section):
    """Malicious simulated sites (simulation only; never active unless kind is set)."""

    kind: Literal["none", "label_flip", "sign_flip", "scale", "gaussian"] = Field(
        "none", description="none, label_flip (train on flipped labels), sign_flip, scale (update x scale), gaussian."
    )
    sites: str = Field("", description="Malicious sites, 1-based numbers, comma separated (e.g. '5' or '2,5').")
    scale: float = Field(10.0, description="kind=scale: factor k applied to the site's update.")
    noise_std: float = Field(1.0, gt=0.0, description="kind=gaussian: std of the random update sent instead.")
    start_round: int = Field(1, ge=1, description="First attacked round.")

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_text(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # --set attack.sites=5
        if isinstance(value, str):
            parse_site_list(value)
        return value


def parse_site_list(value: str) -> tuple[int, ...]:
    """Parse ``attack.sites`` (``"2,5"``) into sorted unique 1-based site numbers.

    Raises:
        ValueError: Not positive whole numbers.
    """
    try:
        sites = tuple(sorted({int(v) for v in str(value).split(",") if v.strip()}))
    except ValueError:
        raise ValueError(f"attack.sites must be 1-based site numbers separated by commas, got {value!r}") from None
    if any(site < 1 for site in sites):
        raise ValueError(f"attack.sites are 1-based (site-1 is 1), got {value!r}")
    return sites


class BaselineConfig(_Section):
    """Centralised baselines trained by ``medfed simulate --baselines`` (pooled and local-only)."""

    epochs: float = Field(
        0.0, ge=0.0, description="Passes over the training data (0 = as many as each site makes in the federated run)."
    )
    optimizer: Literal["same", "sgd", "adam"] = Field("same", description="same = train.optimizer.")
    lr: float = Field(0.0, ge=0.0, description="Learning rate (0 = train.lr).")


class ExperimentConfig(_Section):
    """A complete, validated medfed run description."""

    name: str = Field("medfed", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (letters, digits, _ . -).")
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    central_dp: CentralDPConfig = Field(default_factory=CentralDPConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    clinical: ClinicalConfig = Field(default_factory=ClinicalConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
