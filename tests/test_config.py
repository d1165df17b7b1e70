"""conf/ composes and validates; params.yaml stays in sync; user mistakes are ConfigErrors naming the key."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from slmkit.config import (
    CONF_DIR,
    PARAMS_HEADER,
    Config,
    ConfigError,
    compose,
    load_params,
    section_hash,
    to_dict,
    to_yaml,
    validate,
)
from slmkit.paths import STAGES, stage_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SCRIPT = REPO_ROOT / "scripts" / "compose.py"

# Every option file of every config group, found on disk: a new file is tested without editing this module.
# experiment/ presets set keys across groups (@package _global_): tested on their own below.
GROUP_FILES = sorted(p for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "experiment")
EXPERIMENT_FILES = sorted(CONF_DIR.glob("experiment/*.yaml"))


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _load_compose_script():
    spec = importlib.util.spec_from_file_location("slmkit_compose_script", COMPOSE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_compose(monkeypatch, capsys):
    """`python scripts/compose.py ARGS` in cwd, as its main() runs it: (exit code, stdout, stderr).

    In this process: a new Python spends ~5 s importing torch and transformers (the layout check) before
    it composes anything. The script's own entry point runs as a process in
    test_compose_script_reads_the_conf_beside_it_not_the_installed_packages."""

    def run(*args: str, cwd: Path) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd)
        code = _load_compose_script().main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# --- conf/ composes -------------------------------------------------------------------------------


def test_conf_dir_is_the_repo_conf():
    assert CONF_DIR.resolve() == (REPO_ROOT / "conf").resolve()
    assert GROUP_FILES, "no option files found under conf/<group>/"


# Options a separate build (builder.adapter=separate: the default int4_grid_cpu's, int8_cpu's and int4_cpu's)
# cannot take: each is refused naming the key, and composes with the setting the message names
# (docs/configuration.md lists them).
NEEDS_MERGED_BUILD = {"model=phi3_tiny", "lora=dora"}


@pytest.mark.parametrize("option_file", GROUP_FILES, ids=[f"{p.parent.name}={p.stem}" for p in GROUP_FILES])
def test_every_group_option_composes(option_file: Path):
    group, name = option_file.parent.name, option_file.stem
    extra = []
    if f"{group}={name}" in NEEDS_MERGED_BUILD:
        with pytest.raises(ConfigError, match="builder.adapter=merged"):
            compose([f"{group}={name}", "builder.adapter=separate"])
        extra = ["builder.adapter=merged"]
    cfg = compose([f"{group}={name}", *extra])
    assert isinstance(cfg, Config)
    # The composed section is the chosen file (plus schema defaults for keys the file leaves out).
    full = to_dict(cfg)
    section = _leaves(full[group])
    for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(option_file))).items():
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            value = _get(full, value[2:-1])  # an interpolation, e.g. ${model.target_modules}
        assert section[key] == value, f"{group}.{key} does not come from {option_file}"


def test_default_config_is_typed(cfg: Config):
    # conf/ may write 32 for a float: the typed config converts it.
    assert isinstance(cfg.lora.r, int)
    assert isinstance(cfg.lora.alpha, float)
    assert isinstance(cfg.train.learning_rate, float)
    assert all(isinstance(label, str) for label in cfg.data.labels)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("lora.r=8", "lora.r", 8),
        ("train.learning_rate=0.0005", "train.learning_rate", 0.0005),
        ("seed=7", "seed", 7),
        ("data.labels=[a,b,c]", "data.labels", ["a", "b", "c"]),
        ("builder=fp32_cpu", "builder.precision", "fp32"),
    ],
)
def test_overrides_pass_through(override: str, key: str, value, cfg: Config):
    composed = to_dict(compose([override]))
    assert _get(composed, key) == value
    # Everything else is unchanged.
    before, after = to_dict(cfg), composed
    section = key.split(".")[0]
    for other in before:
        if other != section:
            assert after[other] == before[other]


def test_compose_and_validate_are_fast(cfg: Config):
    compose()  # warm Hydra's imports
    start = time.perf_counter()
    compose(["lora.r=8"])
    compose_s = time.perf_counter() - start
    raw = to_dict(cfg)
    start = time.perf_counter()
    for _ in range(10):
        validate(raw)
    validate_s = (time.perf_counter() - start) / 10
    assert compose_s < 3.0, f"compose took {compose_s:.2f} s"
    assert validate_s < 0.5, f"validate took {validate_s:.3f} s"


# --- user mistakes: ConfigError naming the key -----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+lora.foo=1"], "lora.foo"),
        (["lora.foo=1"], "lora.foo"),
        (["lora.r=abc"], "lora.r"),
        (["lora.r=0"], "lora.r"),
        (["lora.dropout=1.0"], "lora.dropout"),
        (["data.labels=[Joy]"], "data.labels"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "val_fraction"),
        (["builder=fp16_cuda", "builder.execution_provider=cpu"], "builder"),
        (["builder=fp32_cpu", "builder.int4_block_size=32"], "builder.int4_block_size"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_override_is_config_error_naming_the_key(overrides: list[str], key: str):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert key in str(err.value)


# A valid int4 builder section (the default builder is int8), for the int4 value checks below.
INT4 = [
    "builder.precision=int4",
    "builder.int4_block_size=32",
    "builder.int4_accuracy_level=4",
    "builder.int4_algo=default",
]


# The same rules through validate() (what load_params uses): cheaper than a Hydra compose per case.
@pytest.mark.parametrize(
    ("dotlist", "key"),
    [
        (["seed=1.5"], "seed"),
        (["lora.dropout=high"], "lora.dropout"),
        (["lora.r=-4"], "lora.r"),
        (["lora.alpha=0"], "lora.alpha"),
        (["lora.dropout=-0.1"], "lora.dropout"),
        (["lora.target_modules=[]"], "lora.target_modules"),
        (["lora.method=adalora"], "lora.method"),
        (["data.labels=[only]"], "data.labels"),
        (["data.labels=[a,A]"], "data.labels"),
        (["data.labels=[a,' ']"], "data.labels"),
        (["data.max_chars=0"], "data.max_chars"),
        (["data.on_too_long=skip"], "data.on_too_long"),
        (["data.val_fraction=0"], "data.val_fraction"),
        (["data.test_fraction=1"], "data.test_fraction"),
        (["data.val_fraction=0.6", "data.test_fraction=0.6"], "test_fraction"),
        (["model.source=somewhere"], "model.source"),
        (["model.source=hub"], "model.hub_id"),
        (["model.source=hub", "model.hub_id=org/model"], "model.revision"),
        (["model.source=local", "model.path=null"], "model.path"),
        (["model.source=tiny", "model.tiny=null"], "model.tiny"),
        (["model.max_length=4"], "model.max_length"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.torch_dtype=float8"], "train.torch_dtype"),
        (["builder.precision=int3"], "builder.precision"),
        (["builder.execution_provider=tpu"], "builder.execution_provider"),
        ([*INT4, "builder.int4_block_size=33"], "builder.int4_block_size"),
        ([*INT4, "builder.int4_accuracy_level=5"], "builder.int4_accuracy_level"),
        ([*INT4, "builder.int4_algo=gptq"], "builder.int4_algo"),
        (["evaluate.max_new_tokens=0"], "evaluate.max_new_tokens"),
        (["evaluate.decoding=beam"], "evaluate.decoding"),
        (["evaluate.parity_tolerance=-0.01"], "evaluate.parity_tolerance"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_value_is_config_error_naming_the_key(cfg: Config, dotlist: list[str], key: str):
    raw = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.from_dotlist(dotlist))
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert key in str(err.value)


def test_fp16_on_cpu_message_says_why():
    with pytest.raises(ConfigError, match="fp16") as err:
        compose(["builder=fp16_cuda", "builder.execution_provider=cpu"])
    assert "cpu" in str(err.value).lower()


def test_fp16_on_cuda_is_allowed():
    cfg = compose(["builder=fp16_cuda"])
    assert (cfg.builder.precision, cfg.builder.execution_provider) == ("fp16", "cuda")


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        (None, "foo", 1, "foo"),
        ("lora", "foo", 1, "lora.foo"),
        ("train", "learning_rte", 0.1, "train.learning_rte"),
        ("lora", "r", "abc", "lora.r"),
        ("lora", "r", 0, "lora.r"),
        ("data", "labels", ["Joy"], "data.labels"),  # [] is valid: free-text answers
        ("data", "template", "{text} without a label", "data.template"),
        ("data", "template", "{label} before {text}", "data.template"),
        ("data", "template", "no placeholders {label}", "data.template"),
        ("data", "template", "{text} {label} {label}", "data.template"),
    ],
)
def test_validate_names_the_bad_key(cfg: Config, section, key, value, named):
    raw = to_dict(cfg)
    (raw[section] if section else raw)[key] = value
    with pytest.raises(ConfigError) as err:
        validate(raw, source="my.yaml")
    assert named in str(err.value)
    assert "my.yaml" in str(err.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_accepts_its_own_output(cfg: Config):
    assert validate(to_dict(cfg)) == cfg


def test_section_hash_tracks_only_the_named_sections(cfg: Config):
    other = compose(["lora.r=8"])
    assert section_hash(cfg, "data") == section_hash(other, "data")
    assert section_hash(cfg, "lora") != section_hash(other, "lora")
    assert section_hash(cfg, "data", "lora") != section_hash(other, "data", "lora")
    assert section_hash(cfg, "lora") == section_hash(compose(), "lora")


# --- params.yaml ----------------------------------------------------------------------------------


def _committed_params() -> str:
    """params.yaml as committed (HEAD); the working copy when params.yaml is not committed yet.

    `make finetune ARGS=...` rewrites the working copy on purpose, so the check reads git's copy.
    """
    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if shown.returncode == 0:
        return shown.stdout
    return (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")


def test_committed_params_yaml_is_what_conf_composes_to():
    assert _committed_params() == to_yaml(compose()), "params.yaml is stale: run `make params` and commit it"


def test_compose_check_passes_on_a_fresh_params_yaml(tmp_path: Path, run_compose):
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(to_yaml(compose()), encoding="utf-8")
    assert run_compose("--check", cwd=tmp_path)[0] == 0


def test_params_yaml_round_trip(cfg: Config, tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert path.read_text(encoding="utf-8").startswith(PARAMS_HEADER)
    assert load_params(path) == cfg


def test_load_params_missing_file_says_how_to_fix(tmp_path: Path):
    with pytest.raises(ConfigError, match="make params"):
        load_params(tmp_path / "params.yaml")


def test_load_params_invalid_file_names_file_and_key(cfg: Config, tmp_path: Path):
    raw = to_dict(cfg)
    raw["lora"]["dropout"] = 1.5
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert "lora.dropout" in str(err.value)


@pytest.fixture
def tmp_repo(tmp_path: Path) -> Path:
    """A throwaway checkout: the compose script and the conf/ beside it (the script composes that one)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(COMPOSE_SCRIPT, tmp_path / "scripts" / "compose.py")
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    return tmp_path


def test_check_fails_on_stale_params_and_leaves_it_alone(tmp_repo: Path, run_compose):
    stale = to_yaml(compose(["lora.r=8"]))
    (tmp_repo / "params.yaml").write_text(stale, encoding="utf-8")
    code, _, stderr = run_compose("--check", cwd=tmp_repo)
    assert code == 1
    assert "stale" in stderr
    assert (tmp_repo / "params.yaml").read_text(encoding="utf-8") == stale


def test_check_passes_on_fresh_params(tmp_repo: Path, cfg: Config, monkeypatch):
    (tmp_repo / "params.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    monkeypatch.chdir(tmp_repo)
    assert _load_compose_script().main(["--check"]) == 0


def test_check_fails_without_params(tmp_repo: Path, monkeypatch):
    monkeypatch.chdir(tmp_repo)
    assert _load_compose_script().main(["--check"]) == 1
    assert not (tmp_repo / "params.yaml").exists()


def test_compose_script_writes_overrides(tmp_repo: Path, monkeypatch):
    monkeypatch.chdir(tmp_repo)
    script = _load_compose_script()
    assert script.main(["lora.r=8"]) == 0
    assert load_params(tmp_repo / "params.yaml").lora.r == 8
    # Idempotent, and --check agrees with the same overrides.
    assert script.main(["lora.r=8"]) == 0
    assert script.main(["--check", "lora.r=8"]) == 0
    assert script.main(["--check"]) == 1


def test_compose_script_refuses_bad_override(tmp_repo: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_repo)
    assert _load_compose_script().main(["lora.r=0"]) == 1
    assert "lora.r" in capsys.readouterr().err
    assert not (tmp_repo / "params.yaml").exists()


# --- dvc.yaml reads params that exist ------------------------------------------------------------


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_dvc_stages_are_the_pipeline_stages(dvc_stages: dict):
    assert tuple(dvc_stages) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_stage_runs_its_script_and_outputs_its_dir(stage: str, dvc_stages: dict):
    spec = dvc_stages[stage]
    script = f"scripts/{stage}.py"
    assert spec["cmd"] == f"python {script}"
    assert (REPO_ROOT / script).is_file()
    assert script in spec["deps"]
    assert str(stage_dir(stage)) in spec["outs"]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_stage_params_exist_in_config(stage: str, dvc_stages: dict, cfg: Config):
    composed = to_dict(cfg)
    for key in dvc_stages[stage].get("params", []):
        assert isinstance(key, str)
        try:
            _get(composed, key)
        except (KeyError, TypeError):
            pytest.fail(f"dvc.yaml stage {stage} lists param {key!r}, which is not in the config")


# --- experiment presets and real-model layouts ------------------------------------------------------

MODEL_FILES = sorted(CONF_DIR.glob("model/*.yaml"))


@pytest.mark.parametrize("preset", EXPERIMENT_FILES, ids=[p.stem for p in EXPERIMENT_FILES])
def test_every_experiment_preset_composes_and_fits_its_model(preset: Path):
    from slmkit import arch

    cfg = compose([f"experiment={preset.stem}"])
    arch.check(cfg)
    assert to_dict(cfg) != to_dict(compose()), f"{preset} changes nothing"
    # Every group the preset overrides is a real option file of that group.
    for entry in OmegaConf.to_container(OmegaConf.load(preset)).get("defaults", []):
        ((override, choice),) = entry.items()
        assert (CONF_DIR / override.removeprefix("override /") / f"{choice}.yaml").is_file()


def test_reference_preset_is_the_reference_recipe():
    cfg = compose(["experiment=phi3_mini_tones"])
    assert cfg.model.hub_id == "microsoft/Phi-3-mini-4k-instruct"
    assert (cfg.lora.method, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("lora", 64, 64.0, 0.1)
    assert sorted(cfg.lora.target_modules) == ["o_proj", "qkv_proj"]
    assert (cfg.builder.precision, cfg.builder.execution_provider) == ("int4", "cuda")
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.max_grad_norm) == (1, 4, 0.3)


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=[p.stem for p in MODEL_FILES])
def test_model_layout_built_on_meta_device(model_file: Path):
    """Each model config is checked against its architecture without weights: targets exist, size matches."""
    from slmkit import arch

    extra = ["builder.adapter=merged"] if f"model={model_file.stem}" in NEEDS_MERGED_BUILD else []
    cfg = compose([f"model={model_file.stem}", *extra])
    found = arch.check(cfg)
    assert found is not None, f"{model_file}: no layout to check (set model.architecture)"
    assert set(cfg.model.target_modules) <= set(found["modules"])
    if cfg.model.source == "hub":
        assert cfg.model.revision and len(cfg.model.revision) == 40, "hub models are pinned to a commit"
        assert found["parameters"] == cfg.model.architecture["num_parameters"]
        assert 3.7e9 < found["parameters"] < 3.9e9  # the Phi-3-mini class: 3.8 B as published


def test_wrong_architecture_field_is_caught():
    from slmkit import arch

    cfg = compose(["model=phi3_mini_4k", "model.architecture.intermediate_size=4096"])
    with pytest.raises(ConfigError, match="num_parameters"):
        arch.check(cfg)


def test_chat_data_uses_the_models_chat_template():
    smol = compose(["data=tones_chat"])
    phi3 = compose(["data=tones_chat", "model=phi3_mini_4k"])
    phi4 = compose(["data=tones_chat", "model=phi4_mini"])
    assert smol.data.template == "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{label}<|im_end|>"
    assert phi3.data.template == "<|user|>\n{text}<|end|>\n<|assistant|>\n{label}<|end|>"
    assert phi4.data.template == phi4.model.chat_template != phi3.data.template


# --- the documented table of bad configs (docs/configuration.md): each row is a test ---------------

DOCS_CONFIG = REPO_ROOT / "docs" / "configuration.md"


def _bad_config_rows() -> list[tuple[str, str, str]]:
    text = DOCS_CONFIG.read_text(encoding="utf-8")
    table = text.split("<!-- bad-config-table -->")[1].split("<!-- /bad-config-table -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], cells[1], cells[2]))
    return rows


BAD_CONFIG_ROWS = _bad_config_rows()


def test_bad_config_table_has_enough_kinds():
    assert len(BAD_CONFIG_ROWS) >= 10
    assert len({row[0] for row in BAD_CONFIG_ROWS}) == len(BAD_CONFIG_ROWS)


@pytest.mark.parametrize(("overrides", "key", "says"), BAD_CONFIG_ROWS, ids=[r[0] for r in BAD_CONFIG_ROWS])
def test_documented_bad_config(overrides: str, key: str, says: str):
    """What `make params ARGS=...` runs (scripts/compose.py: compose, then the layout check) refuses it."""
    import shlex

    compose_script = _load_compose_script()
    with pytest.raises(ConfigError) as err:
        cfg = compose(shlex.split(overrides))
        compose_script.arch.check(cfg)
    message = str(err.value)
    assert f"'{key}" in message or f"{key}=" in message, message
    assert says in message, message


def test_bad_config_exits_1_without_traceback_or_params(tmp_path: Path, run_compose):
    # An exception out of main() would fail this test before any assert: no traceback reaches the user.
    code, _, stderr = run_compose("lora.target_modules=[qkv_proj]", cwd=tmp_path)
    assert code == 1
    assert "lora.target_modules" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "params.yaml").exists()


# --- templates and overrides typed on the command line -------------------------------------------


def test_backslash_n_in_a_template_override_is_a_newline():
    """Hydra keeps a quoted override's backslashes; a template typed as one line means the lines it shows."""
    phi3 = "<|user|>\\n{text}<|end|>\\n<|assistant|>\\n{label}<|end|>"
    cfg = compose([f"model.chat_template='{phi3}'", "data=tones_chat"])
    assert cfg.model.chat_template == "<|user|>\n{text}<|end|>\n<|assistant|>\n{label}<|end|>"
    assert cfg.data.template == cfg.model.chat_template
    # The shipped default template, typed on the command line, composes to itself.
    typed = compose(["data.template='### Text: {text}\\n### The tone is:\\n{label}'"])
    assert typed.data.template == compose([]).data.template


def test_unparsable_override_is_one_line_naming_it_and_how_to_quote(tmp_path: Path, run_compose):
    # What `make params ARGS="model.chat_template='<|user|>...'"` passes on: its shell removed the quotes.
    override = "model.chat_template=<|user|>\\n{text}<|end|>\\n<|assistant|>\\n{label}<|end|>"
    code, _, stderr = run_compose(override, cwd=tmp_path)
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert override in stderr and "at '<|'" in stderr
    assert 'ARGS="model.chat_template=\\"\'...\'\\""' in stderr, stderr  # the key, quoted twice
    assert not (tmp_path / "params.yaml").exists()


def test_an_override_with_several_values_outside_a_sweep_says_to_sweep():
    with pytest.raises(ConfigError) as err:
        compose(["lora.r=4,8"])
    assert str(err.value).count("\n") == 0 and "lora.r=4,8" in str(err.value)
    assert "make sweep" in str(err.value)


# --- each value said once --------------------------------------------------------------------------


def _parent(option_file: Path) -> Path | None:
    """The option this file extends (a defaults-list entry naming a sibling in its own group), if any."""
    raw = OmegaConf.to_container(OmegaConf.load(option_file))
    siblings = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return option_file.with_name(f"{siblings[0]}.yaml") if siblings else None


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key != "defaults":
                out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


@pytest.mark.parametrize("option_file", GROUP_FILES, ids=[f"{p.parent.name}={p.stem}" for p in GROUP_FILES])
def test_an_option_that_extends_another_restates_none_of_its_values(option_file: Path):
    parent = _parent(option_file)
    if parent is None:
        # No parent option: its defaults may only pick another group's option (data=qa picks its builder).
        defaults = [d for d in OmegaConf.to_container(OmegaConf.load(option_file)).get("defaults", []) if d != "_self_"]
        picks = all(isinstance(d, dict) and next(iter(d)).startswith("override /") for d in defaults)
        assert picks or option_file.parent.name == "experiment", defaults
        return
    mine = _leaves(OmegaConf.to_container(OmegaConf.load(option_file)))
    inherited = {}
    while parent is not None:  # the whole chain of parents
        inherited = {**_leaves(OmegaConf.to_container(OmegaConf.load(parent))), **inherited}
        parent = _parent(parent)
    same = sorted(k for k, v in mine.items() if k in inherited and inherited[k] == v)
    assert not same, f"{option_file} restates {same}, which it inherits: say each value once"


def test_schema_defaults_agree_with_every_yaml_that_sets_them():
    """A dataclass default is the value a key has when no yaml sets it; a yaml that sets another value makes
    the schema say one thing and conf/ another. Keys every option sets carry no default at all (MISSING)."""
    import dataclasses

    from omegaconf import MISSING

    from slmkit import config as schema

    sections = {
        f.name: f.default_factory
        for f in dataclasses.fields(schema.Config)
        if f.default_factory is not dataclasses.MISSING
    }
    problems = []
    for group, factory in sections.items():
        files = sorted((CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else [CONF_DIR / "config.yaml"]
        for f in dataclasses.fields(factory()):
            if f.default is dataclasses.MISSING or f.default is MISSING or f.default is None:
                continue
            for file in files:
                raw = OmegaConf.to_container(OmegaConf.load(file))
                raw = raw.get(group, {}) if file.name == "config.yaml" else raw
                if f.name in raw and raw[f.name] != f.default:
                    problems.append(f"{group}.{f.name}: schema default {f.default!r}, {file.name} sets {raw[f.name]!r}")
    assert not problems, "\n".join(problems)


def test_compose_script_reads_the_conf_beside_it_not_the_installed_packages(tmp_repo: Path):
    """A copy of the repo (a test workspace, a sweep job) composes its own conf/: slmkit may be installed
    from another checkout, whose conf/ says something else."""
    conf = tmp_repo / "conf" / "config.yaml"
    conf.write_text(conf.read_text().replace("- experiment: null", "- experiment: tiny"))
    result = subprocess.run(
        [sys.executable, str(tmp_repo / "scripts" / "compose.py")], cwd=tmp_repo, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_repo / "params.yaml").read_text())["model"]["name"] == "phi3_tiny"
