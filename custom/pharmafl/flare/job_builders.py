"""Every pharmafl job, built once in Python with FLARE's Job API (``FedJob``).

``pharmafl jobs export`` writes the folders under ``jobs/``, ``pharmafl simulate`` (and the experiments and
benchmarks) export a run's copy with the run's settings, and a test fails when a folder under ``jobs/``
differs from what its builder makes. A job's choices that differ from a settings dataclass's defaults are
stated here and only here; the defaults live in the dataclasses (``TrainConfig``, ``TrunkConfig``,
``BindingSiteConfig``, ``LoRASettings``, ``SecureSumConfig``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.apis.job_def import ALL_SITES
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
from nvflare.job_config.stats_job import StatsJob

from pharmafl.clinical.statistics import MIN_COUNT, OUTPUT, STATISTICS, statistics_file
from pharmafl.core.errors import InputError
from pharmafl.core.settings import apply_settings, field_types, non_default, settings
from pharmafl.flare.fedavg_aggregator import FedAvgAggregator
from pharmafl.flare.fra_lora_aggregator import FRALoRAAggregator
from pharmafl.flare.secure_sum_blind import BlindModelLocator, BlindShareableGenerator
from pharmafl.flare.secure_sum_site import SecureMaskFilter, SecureSumExecutor, SecureSumSite, SecureTaskDataFilter
from pharmafl.flare.secure_sum_workflow import SETTINGS as SECURE_SUM_SETTINGS
from pharmafl.flare.secure_sum_workflow import SecureSumWorkflow
from pharmafl.flare.state_persistor import NumpyStateLocator, NumpyStatePersistor
from pharmafl.flare.trunk_only_filter import TrunkOnlyFilter
from pharmafl.multitask.model import TrunkModel
from pharmafl.secure_sum.config import SecureSumConfig

TRAIN, VALIDATE = "train", "validate"
SECURE_SUM_TASKS = ["secagg_advertise", "secagg_share_keys", "secagg_consistency", "secagg_unmask", "secagg_ledger"]
SERVER_PARAMS = {"server": {"task_request_interval": 0.5}}
EVAL_TIMEOUT = 1800  # seconds a secure job's final cross-site evaluation may take
TB_EVENT = "analytix_log_stats"


@dataclass(frozen=True)
class JobOptions:
    """What a run changes in a job: its rounds, the number of sites it runs on, and its settings.

    ``settings`` maps ``NAME`` or ``GROUP.NAME`` to a value (``--set``): a field of one of the executor's setting
    groups (``training``, ``trunk``, ``lora``), of a secure-sum job's ``secure_sum`` settings, or another executor
    argument (``upload``, ``model``, ...). ``initial_model`` starts a multi-task job's trunk from a saved state dict.

    For tests (``pharmafl.testing``): ``site_component`` replaces a secure-sum job's ``SecureSumSite`` (fault
    injection, plaintext recording), ``workflow_class`` its ``SecureSumWorkflow`` (recorders, a malicious server),
    and ``server_args`` adds arguments to the training workflow (and ``validation_timeout`` to the final evaluation).
    """

    num_rounds: int | None = None
    sites: int | None = None
    settings: dict = field(default_factory=dict)
    initial_model: str = ""
    site_component: object | None = None
    workflow_class: type | None = None
    server_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobDefinition:
    """One job: its family (``multitask`` or ``esm``), the executor arguments it chooses, its rounds and sites."""

    family: str
    executor_args: dict
    num_rounds: int
    min_clients: int
    secure_sum: dict | None = None  # the SecureSumWorkflow's settings; None: not a secure-sum job
    fra_lora: bool = False  # ESM-2 jobs: FRA-LoRA (else FedAvg of the factors)
    meta: dict = field(default_factory=dict)


TRUNK_ONLY = {"scope": "trunk-only"}  # meta.json: what the job shares (a site's policy may demand it)
MULTITASK_ARGS = {"training": {"dropout": 0.5}}  # MELLODDY-style regularisation of the 400-unit trunk
ESM2_35M = "facebook/esm2_t12_35M_UR50D"  # the Apheris geometry (a hub download; the tests use the offline 8M)
SECURE_MULTITASK = {"clip": 1.0, "max_weight": 1000.0, "modulus_bits": 32}
JOBS: dict[str, JobDefinition] = {
    "multitask_fedavg": JobDefinition("multitask", MULTITASK_ARGS, 13, 3, meta=TRUNK_ONLY),
    "multitask_secure": JobDefinition("multitask", MULTITASK_ARGS, 13, 2, SECURE_MULTITASK, meta=TRUNK_ONLY),
    "multitask_secure_blind": JobDefinition(
        "multitask", MULTITASK_ARGS, 13, 2, {**SECURE_MULTITASK, "server_blind": True}, meta=TRUNK_ONLY
    ),
    # naive averaging: sites of a lower rank (site_ranks) zero-pad their factors to the global rank (HetLoRA)
    "esm2_lora_fedavg": JobDefinition(
        "esm", {"model": ESM2_35M, "optimizer_state": "reset", "upload": "padded"}, 10, 2
    ),
    "esm2_lora_fra": JobDefinition("esm", {"model": ESM2_35M, "optimizer_state": "reset"}, 10, 2, fra_lora=True),
    "esm2_lora_fra_secure": JobDefinition(
        "esm",
        {"model": ESM2_35M, "upload": "delta", "optimizer_state": "reset"},
        10,
        2,
        {"clip": 4.0, "max_weight": 1000.0, "modulus_bits": 64},
        fra_lora=True,
    ),
    # DP-SGD at every site (sample-level, RDP accountant): epsilon 8 over the job's 13 rounds, delta 1/N per site
    "multitask_dp": JobDefinition(
        "multitask", {**MULTITASK_ARGS, "dp": {"target_epsilon": 8.0, "max_grad_norm": 1.0}}, 13, 3, meta=TRUNK_ONLY
    ),
    "eicu_fedavg": JobDefinition("eicu", {}, 10, 4),  # the four regions; FedProx: --set fedprox_mu=0.01
    # FLARE's federated statistics of the eICU features (one pass, no rounds): the training job standardises with it
    "eicu_statistics": JobDefinition("statistics", {"min_count": MIN_COUNT}, 1, 4),
}
# imported when a job of the family is built: the ESM-2 executor brings transformers and peft with it
EXECUTORS = {
    "multitask": "pharmafl.flare.multitask_executor.MultiTaskExecutor",
    "esm": "pharmafl.flare.esm_lora_executor.ESMLoRAExecutor",
}


# the data the sites of a family read, where no executor of ours declares it (FLARE's Client API and statistics)
DATA_KINDS = {"eicu": "eicu", "statistics": "eicu"}
CROSS_SITE_RESULTS = "cross_site_val/cross_val_results.json"


def result_file(name: str) -> str:
    """The file a finished run of job ``name`` has written under the server's run folder."""
    if definition(name).family == "statistics":
        return OUTPUT
    return CROSS_SITE_RESULTS


def executor_class(family: str) -> type:
    module, _, name = EXECUTORS[family].rpartition(".")
    return getattr(importlib.import_module(module), name)


def definition(name: str) -> JobDefinition:
    if name not in JOBS:
        raise InputError(f"there is no pharmafl job '{name}'; the jobs are: {', '.join(JOBS)}.")
    return JOBS[name]


def _plain_arguments(executor: type) -> dict[str, object]:
    """The executor's arguments that are not a setting group or FLARE wiring, and their types."""
    hints = typing.get_type_hints(executor.__init__)
    skip = {"self", "data_root", "log_writer_id", "train_task_name", "validate_task_name", *executor.SETTINGS}
    return {p: hints.get(p, object) for p in inspect.signature(executor.__init__).parameters if p not in skip}


def resolve_settings(name: str, values: dict) -> tuple[dict, dict | None]:
    """(executor arguments, secure_sum settings) of job ``name`` with ``values`` (``--set``) applied."""
    spec = definition(name)
    if spec.family == "eicu":  # the training script's settings (its command line), and the global statistics
        from pharmafl.clinical.train import MortalityConfig
        from pharmafl.privacy.dp_sgd import DPConfig

        groups = {"training": field_types(MortalityConfig), "dp": field_types(DPConfig)}
        return apply_settings(dict(spec.executor_args), values, groups, {"statistics": str}, name), None
    if spec.family == "statistics":  # FLARE's privacy filter: the fewest observed values a site reports
        return apply_settings(dict(spec.executor_args), values, {}, {"min_count": int}, name), None
    executor = executor_class(spec.family)
    groups = {group: field_types(cls) for group, cls in executor.SETTINGS.items()}
    args = dict(spec.executor_args)
    if spec.secure_sum is not None:
        secure_types = field_types(SecureSumConfig)
        groups["secure_sum"] = {f: secure_types[f] for f in SECURE_SUM_SETTINGS}
        args["secure_sum"] = spec.secure_sum
    args = apply_settings(args, values, groups, _plain_arguments(executor), name)
    return args, args.pop("secure_sum", None)


def build_job(name: str, options: JobOptions | None = None) -> FedJob:
    """The FedJob ``name`` with ``options`` applied; InputError for settings its components refuse."""
    options = options or JobOptions()
    spec = definition(name)
    args, secure_sum = resolve_settings(name, options.settings)
    rounds = spec.num_rounds if options.num_rounds is None else options.num_rounds
    sites = spec.min_clients if options.sites is None else options.sites
    if rounds <= 0 or sites <= 0:
        raise InputError(f"a job needs at least one round and one site, got {rounds} rounds and {sites} sites.")
    try:
        if spec.family == "eicu":
            return _eicu(name, args.get("training"), args.get("statistics", ""), rounds, sites, args.get("dp"))
        if spec.family == "statistics":
            return _eicu_statistics(name, args["min_count"], sites)
        args = _planned_dp_epochs(args, rounds)
        executor = executor_class(spec.family)(**args)
        if spec.family == "multitask":
            return _multitask(name, spec, executor, rounds, sites, secure_sum, options)
        return _esm(name, spec, executor, rounds, sites, secure_sum, options)
    except ValueError as err:  # a component's own check of a value (a TypeError is a bug: it keeps its traceback)
        if isinstance(err, InputError):
            raise
        raise InputError(f"{name} refuses its settings: {err}") from err


def _planned_dp_epochs(args: dict, rounds: int) -> dict:
    """A DP budget given as a target epsilon alone is spread over the run: rounds x local epochs (``dp.epochs``).

    An ESM-2 site has no local epochs: its DP epoch is one round of ``local_steps`` steps, so ``dp.epochs`` is the
    rounds (``training`` has no ``local_epochs`` there)."""
    dp = args.get("dp") or {}
    if dp.get("target_epsilon") is None or dp.get("noise_multiplier") is not None or dp.get("epochs") is not None:
        return args
    epochs = rounds * int((args.get("training") or {}).get("local_epochs", 1))
    return {**args, "dp": {**dp, "epochs": epochs}}


def export_job(name: str, out_root: str | Path, options: JobOptions | None = None) -> Path:
    """Build ``name`` and export it to ``out_root/name`` (replacing an earlier export there)."""
    build_job(name, options).export_job(str(out_root))
    return Path(out_root) / name


def _job(name: str, spec: JobDefinition, sites: int, secure_sum: dict | None) -> FedJob:
    job = FedJob(name=name, min_clients=threshold_or(sites, secure_sum), meta_props=dict(spec.meta) or None)
    job.set_app_packages(["pharmafl"])  # the sites run the installed package: nothing is copied into custom/
    job.to_server(dict(SERVER_PARAMS))
    return job


def _client_side(job: FedJob, executor, tasks: list[str]) -> None:
    job.to_clients(executor, tasks=tasks)
    job.to_clients(TBWriter(event_type=TB_EVENT), id="log_writer")
    job.to_clients(ConvertToFedEvent(events_to_convert=[TB_EVENT], fed_event_prefix="fed."), id="event_to_fed")


def _server_widgets(job: FedJob) -> None:
    job.to_server(ValidationJsonGenerator(), id="json_generator")
    job.to_server(TBAnalyticsReceiver(events=[f"fed.{TB_EVENT}"]), id="tb_receiver")


def _secure_client_side(job: FedJob, options: JobOptions, result_filters: list, validate_filters: list) -> None:
    """The site half of the secure sum: its component, the executor of the protocol tasks, the mask filters."""
    job.to_clients(SecureSumExecutor(site_component_id="secure_sum"), tasks=SECURE_SUM_TASKS)
    for task_filter in [*result_filters, SecureMaskFilter(site_component_id="secure_sum")]:
        job.to_clients(task_filter, filter_type=FilterType.TASK_RESULT, tasks=[TRAIN])
    for task_filter in validate_filters:
        job.to_clients(task_filter, filter_type=FilterType.TASK_RESULT, tasks=[VALIDATE])
    for task in (TRAIN, VALIDATE):  # one task per filter chain: FLARE exports a chain's tasks in set order
        job.to_clients(
            SecureTaskDataFilter(site_component_id="secure_sum"), filter_type=FilterType.TASK_DATA, tasks=[task]
        )
    job.to_clients(options.site_component or SecureSumSite(train_task_name=TRAIN), id="secure_sum")


def _secure_workflow(rounds: int, secure_sum: dict, options: JobOptions, **args) -> SecureSumWorkflow:
    workflow_class = options.workflow_class or SecureSumWorkflow
    wiring = {
        "num_rounds": rounds,
        "min_clients": 0,  # FLARE's min_clients (meta.json) is the threshold: the workflow waits for t sites
        "wait_time_after_min_received": 60,
        "train_timeout": 1800,
        "task_timeout": 300,
        "train_task_name": TRAIN,
        "persistor_id": "persistor",
        "shareable_generator_id": "shareable_generator",
        "secure_sum": secure_sum,
    }
    return workflow_class(**{**wiring, **args, **_workflow_args(options)})


def _scatter_and_gather(rounds: int, sites: int, options: JobOptions, **args) -> ScatterAndGather:
    wiring = {
        "min_clients": sites,
        "num_rounds": rounds,
        "wait_time_after_min_received": 0,
        "aggregator_id": "aggregator",
        "persistor_id": "persistor",
        "shareable_generator_id": "shareable_generator",
        "train_task_name": TRAIN,
        "train_timeout": 0,
    }
    return ScatterAndGather(**{**wiring, **args, **_workflow_args(options)})


def _global_model_eval(secure: bool, options: JobOptions) -> GlobalModelEval:
    timeout = options.server_args.get("validation_timeout", EVAL_TIMEOUT if secure else None)
    args = {"validation_timeout": timeout} if timeout is not None else {}
    return GlobalModelEval(model_locator_id="model_locator", validation_task_name=VALIDATE, **args)


def _workflow_args(options: JobOptions) -> dict:
    return {k: v for k, v in options.server_args.items() if k != "validation_timeout"}


def _multitask(name, spec, executor, rounds, sites, secure_sum, options) -> FedJob:
    job = _job(name, spec, sites, secure_sum)
    trunk = executor.trunk_config
    model = TrunkModel(n_features=trunk.n_features, hidden_sizes=list(trunk.hidden_sizes), seed=executor.config.seed)
    blind = bool(secure_sum and secure_sum.get("server_blind"))
    if secure_sum is None:
        job.to_server(
            _scatter_and_gather(rounds, sites, options),
            id="scatter_and_gather",
        )
    else:
        workflow = _secure_workflow(rounds, secure_sum, options, aggregation="mean", output_data_kind="WEIGHT_DIFF")
        job.to_server(workflow, id="secure_sum")
    job.to_server(_global_model_eval(secure_sum is not None, options), id="global_model_eval")
    start = {"source_ckpt_file_full_name": options.initial_model} if options.initial_model else {}
    job.to_server(PTFileModelPersistor(model=model, **start), id="persistor")
    generator = BlindShareableGenerator() if blind else FullModelShareableGenerator()
    job.to_server(generator, id="shareable_generator")
    if secure_sum is None:
        job.to_server(FedAvgAggregator(expected_data_kind="WEIGHT_DIFF", weigh_by_local_steps=True), id="aggregator")
    locator = (
        BlindModelLocator(shareable_generator_id="shareable_generator", model_name="server_blind_global_model")
        if blind
        else PTFileModelLocator(pt_persistor_id="persistor")
    )
    job.to_server(locator, id="model_locator")
    _server_widgets(job)
    _client_side(job, executor, [TRAIN, VALIDATE])
    if secure_sum is None:
        for task in (TRAIN, VALIDATE):  # one task per filter chain: FLARE exports a chain's tasks in set order
            job.to_clients(TrunkOnlyFilter(), filter_type=FilterType.TASK_RESULT, tasks=[task])
    else:
        _secure_client_side(job, options, [TrunkOnlyFilter()], [TrunkOnlyFilter()])
    return job


def _esm(name, spec, executor, rounds, sites, secure_sum, options) -> FedJob:
    job = _job(name, spec, sites, secure_sum)
    rank = executor.lora_settings.rank
    if secure_sum is None:
        job.to_server(
            # round 0 sends no weights: every site starts from the same seeded adapter
            _scatter_and_gather(rounds, sites, options, allow_empty_global_weights=True),
            id="scatter_and_gather",
        )
    else:
        workflow = _secure_workflow(
            rounds,
            secure_sum,
            options,
            aggregation="fra-lora",
            fra_lora={"rank": rank, "residual_policy": "drop"},
            output_data_kind="WEIGHTS",
        )
        job.to_server(workflow, id="secure_sum")
    job.to_server(_global_model_eval(secure_sum is not None, options), id="global_model_eval")
    job.to_server(NumpyStatePersistor(), id="persistor")
    job.to_server(FullModelShareableGenerator(), id="shareable_generator")
    if secure_sum is None:
        aggregator = (
            FRALoRAAggregator(rank=rank, upload=executor.upload, residual_policy="drop")
            if spec.fra_lora
            else FedAvgAggregator(expected_data_kind="WEIGHTS")
        )
        job.to_server(aggregator, id="aggregator")
    job.to_server(NumpyStateLocator(persistor_id="persistor"), id="model_locator")
    _server_widgets(job)
    _client_side(job, executor, [TRAIN, VALIDATE])
    if secure_sum is not None:
        _secure_client_side(job, options, [], [])
    return job


def _eicu(name: str, training: dict | None, statistics: str, rounds: int, sites: int, dp: dict | None = None) -> FedJob:
    """FLARE's FedAvg controller, the Client API script under FLARE's script runner, and a final evaluation of the
    global model at every site (FLARE's cross-site evaluation without local models, as its recipes add it).

    ``statistics``: the federated statistics the sites standardise with (empty: each site its own). ``dp``: DP-SGD
    at every site (``--set dp.NAME=VALUE``), passed to the script as ``--dp-NAME VALUE``; a target epsilon alone is
    planned over rounds x local epochs."""
    # imported here, as the executors are: the clinical code brings scikit-learn with it
    from pharmafl.clinical.mortality import DP_PREFIX
    from pharmafl.clinical.train import MortalityConfig, MortalityNet, n_inputs
    from pharmafl.flare import mortality_client
    from pharmafl.privacy.dp_sgd import DPConfig

    config = settings(MortalityConfig, training, "training")
    dp = _planned_dp_epochs({"dp": dp or {}, "training": {"local_epochs": config.local_epochs}}, rounds)["dp"]
    dp_config = settings(DPConfig, dp, "dp")
    job = FedJob(name=name, min_clients=sites)
    job.set_app_packages(["pharmafl"])  # the script imports the installed package: nothing else is copied
    model = MortalityNet(n_inputs(), config.model, config.hidden, config.seed)
    job.to_server(FedAvg(num_clients=sites, num_rounds=rounds, persistor_id="persistor"), id="fedavg")
    job.to_server(PTFileModelPersistor(model=model), id="persistor")
    job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id="model_locator")
    job.to_server(ValidationJsonGenerator(), id="json_generator")
    job.to_server(
        CrossSiteModelEval(model_locator_id="model_locator", submit_model_task_name="", validation_timeout=600),
        id="final_evaluation",
    )
    given = {**non_default(config), **{DP_PREFIX + key: value for key, value in non_default(dp_config).items()}}
    train_args = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in given.items())
    if statistics:  # found here: the file itself, absolute; else as given (a site resolves it under its data root)
        with contextlib.suppress(InputError):
            statistics = str(statistics_file(statistics).resolve())
        train_args = f"{train_args} --stats {shlex.quote(statistics)}".strip()
    script = Path(mortality_client.__file__)
    # the script by its name, so that the job says "mortality_client.py" (found in app/custom at the site), not
    # this checkout's path; the file itself goes into app/custom as a file source
    with contextlib.chdir(script.parent):  # FLARE checks that the named script exists
        job.to_clients(ScriptRunner(script=script.name, script_args=train_args, framework=FrameworkType.PYTORCH))
    job.add_file_to_clients(str(script))
    return job


def _eicu_statistics(name: str, min_count: int, sites: int) -> FedJob:
    """FLARE's own statistics job (``StatsJob``: its controller, JSON writer, executor and privacy filters) with
    the eICU site component; every site gets the same app."""
    from pharmafl.flare.eicu_statistics import EicuStatistics

    if min_count < 1:
        raise InputError(f"min_count must be at least 1, got {min_count}.")
    job = StatsJob(name, STATISTICS, EicuStatistics(), OUTPUT, min_count=min_count)
    job.set_app_packages(["pharmafl"])
    job.setup_clients([ALL_SITES])
    return job


def threshold_or(sites: int, secure_sum: dict | None) -> int:
    """The sites FLARE needs alive to go on: all of them, or a secure-sum job's threshold t (default a majority)."""
    if secure_sum is None:
        return sites
    return secure_sum.get("threshold") or sites // 2 + 1
