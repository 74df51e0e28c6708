"""compare.yaml validation (one line naming the field, exit 2), study presets and matched parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adaptlab.compare.arms import expand, lora_params, resolve_ranks, study_arms
from adaptlab.compare.spec import STUDIES, build_spec
from adaptlab.errors import UserError

BASE = {"model": "tiny-random", "data": {"train": ["python-stdlib"]}, "tokens": 1000, "seeds": 1}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("arms", "field", "words"),
    [
        ([{"name": "a", "method": "lorax"}], "arms.0.method", "'full', 'lora'"),
        ([{"name": "a", "method": "lora", "rank": 0}], "arms.0.rank", "greater than 0"),
        (
            [{"name": "a", "method": "lora", "lr": 1e-4, "lr_sweep": [1e-4, 2e-4]}],
            "arms.0",
            "both lr and lr_sweep",
        ),
        ([{"name": "a", "method": "lora", "ranks": 4}], "arms.0.ranks", "unknown field"),
        ([{"name": "a", "method": "full"}, {"name": "a", "method": "lora"}], "top level", "unique"),
        ([{"name": "a b", "method": "full"}], "arms.0.name", "letters, digits"),
        ([{"name": "a", "method": "lora", "match_params": "zz"}], "top level", "names no arm"),
    ],
)
def test_bad_arm_is_one_line_naming_the_field_and_exit_2(run_cli, tmp_path, arms, field, words) -> None:
    cfg = write(tmp_path, {**BASE, "arms": arms})
    code, out, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {cfg} field {field}:"), lines[0]
    assert words in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_budget_and_unknown_study_name_their_fields() -> None:
    with pytest.raises(UserError, match=r"field tokens: Field required"):
        build_spec({"data": {"train": ["x"]}, "study": "methods"})
    with pytest.raises(UserError, match=r"field study: unknown study 'nope'"):
        build_spec({**BASE, "study": "nope"})
    with pytest.raises(UserError, match="give a list of arms or a study"):
        build_spec(BASE)


@pytest.mark.parametrize("name", ["x.yaml", "a.log"])
def test_an_arm_name_that_is_a_run_file_name_is_refused(name) -> None:
    with pytest.raises(UserError, match=r"arms.0.name: an arm name may not end in .yaml or .log"):
        build_spec({**BASE, "arms": [{"name": name, "method": "lora"}]})


def test_unknown_force_arm_lists_the_arms(run_cli, tmp_path) -> None:
    cfg = write(tmp_path, {**BASE, "arms": [{"name": "full", "method": "full"}]})
    code, _, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "o", "--force", "nope")
    assert code == 2
    assert "--force nope: no such arm; arms: full" in err


@pytest.mark.parametrize("study", [None, "rl"])
def test_seq_len_beyond_the_models_positions_stops_compare_before_any_arm(run_cli, tmp_path, study) -> None:
    args = ["compare", "--model", "tiny-random", "--seq-len", "100000"]
    args += ["--tokens", "64", "--data", "python-stdlib"] if study is None else ["--study", study]
    code, _, err = run_cli(*args, "--out", tmp_path / "c")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--seq-len 100000 exceeds the 2,048 positions" in err, err
    assert not (tmp_path / "c" / "runs").exists()


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_builds_runs(study: str) -> None:
    second = ["b.jsonl"] if study in ("regime", "continual") else []  # their second data set
    spec = build_spec({**BASE, "study": study, "study_data": second})
    arms = study_arms(study, spec.model, spec.tokens, spec.train.lr, spec.study_data)
    spec = spec.model_copy(update={"arms": arms})
    arms, _ = resolve_ranks(spec)
    plans = expand(spec, arms)
    assert plans and len({p.run for p in plans}) == len(plans)
    if study == "lr":
        assert all(p.sweep for p in plans)
    if study == "methods":
        assert {a.name for a in arms} >= {"full", "lora", "lora-attn", "rslora", "dora"}


def test_attention_only_rank_is_raised_to_match_all_linear_params() -> None:
    spec = build_spec(
        {
            **BASE,
            "arms": [
                {"name": "lora", "method": "lora", "rank": 4},
                {"name": "attn", "method": "lora", "targets": "attention", "match_params": "lora"},
            ],
        }
    )
    arms, notes = resolve_ranks(spec)
    attn = next(a for a in arms if a.name == "attn")
    want = lora_params("tiny-random", "all-linear", 4)
    got = lora_params("tiny-random", "attention", attn.rank)
    assert attn.rank > 4
    assert abs(got - want) <= lora_params("tiny-random", "attention", 1) / 2 + 1
    assert "matched to lora" in notes[0]


def test_lora_params_counts_what_peft_trains(tiny) -> None:
    from adaptlab.config import MethodSpec
    from adaptlab.methods import apply_method, param_report
    from adaptlab.models import load_model

    model = load_model("tiny-random").model
    peft_model = apply_method(model, MethodSpec(method="lora", rank=3, targets="attention"))
    assert param_report(peft_model).trainable == lora_params("tiny-random", "attention", 3)


def test_default_lr_rule_and_same_data_order_for_every_arm() -> None:
    spec = build_spec(
        {
            **BASE,
            "train": {"lr": 1e-4},
            "arms": [{"name": "f", "method": "full"}, {"name": "l", "method": "lora"}],
        }
    )
    plans = expand(spec, spec.arms)
    by = {p.arm: p for p in plans}
    assert by["f"].lr == pytest.approx(1e-4) and by["l"].lr == pytest.approx(1e-3)
    assert by["f"].lr_source == by["l"].lr_source == "rule"
    keys = ("steps", "batch", "grad_accum", "seq_len")
    assert [by["f"].train_fields[k] for k in keys] == [by["l"].train_fields[k] for k in keys]
    assert by["f"].seed == by["l"].seed and by["f"].data_sources == by["l"].data_sources


def test_seeds_and_sweeps_expand_into_runs() -> None:
    spec = build_spec(
        {
            **BASE,
            "seeds": 2,
            "arms": [
                {"name": "l", "method": "lora", "lr_sweep": [1e-4, 1e-3]},
                {"name": "f", "method": "full"},
            ],
        }
    )
    runs = {p.run: p for p in expand(spec, spec.arms)}
    assert set(runs) == {"l-lr1.0e-4-s0", "l-lr1.0e-3-s0", "l-s1", "f-s0", "f-s1"}
    assert runs["l-s1"].lr is None  # decided by the sweep at seed 0
    assert runs["f-s1"].seed == runs["f-s0"].seed + 1


def test_arm_and_train_settings_fields_are_the_run_config_fields() -> None:
    """One definition: an arm's method fields and the shared step fields are config.py's, bounds included."""
    from adaptlab.compare.spec import ArmSpec, TrainSettings
    from adaptlab.config import MethodSpec, StepSpec, TrainSpec

    for spec, source in ((ArmSpec, MethodSpec), (TrainSettings, StepSpec)):
        for name, field in source.model_fields.items():
            derived = spec.model_fields[name]
            assert derived.metadata == field.metadata, name
            if name != "method":  # an arm must name its method
                assert derived.default == field.default, name
    for name in ("lr", "batch", "grad_accum", "tokens"):  # per-arm overrides keep TrainSpec's bounds
        assert ArmSpec.model_fields[name].metadata == TrainSpec.model_fields[name].metadata
        assert ArmSpec.model_fields[name].default is None
    with pytest.raises(UserError, match=r"arms.0.dropout: Input should be less than 1"):
        build_spec({**BASE, "arms": [{"name": "a", "method": "lora", "dropout": 1.0}]})
    with pytest.raises(UserError, match=r"arms.0.batch: Input should be greater than 0"):
        build_spec({**BASE, "arms": [{"name": "a", "method": "lora", "batch": 0}]})


def test_compare_needs_a_test_split_a_run_does_not() -> None:
    from adaptlab.config import build_config

    assert build_config({"data": {"test_frac": 0.0}}).data.test_frac == 0.0
    with pytest.raises(
        UserError, match=r"field data.test_frac: must be greater than 0: learning is measured"
    ):
        build_spec({**BASE, "data": {"train": ["x"], "test_frac": 0.0}, "study": "methods"})
    with pytest.raises(UserError, match=r"field data.train: give at least one data source"):
        build_spec({**BASE, "data": {"train": []}, "study": "methods"})


def test_one_lr_rule_for_train_compare_and_plan() -> None:
    from adaptlab.config import build_config
    from adaptlab.plan.advice import suggested_lrs

    spec = build_spec({**BASE, "arms": [{"name": "f", "method": "full"}, {"name": "d", "method": "dora"}]})
    lrs = {p.arm: p.lr for p in expand(spec, spec.arms)}
    for method, arm in (("full", "f"), ("dora", "d")):
        assert build_config({"method": {"method": method}}).resolved_lr() == lrs[arm]
    assert suggested_lrs()["full"] == lrs["f"] and suggested_lrs()["lora"] == lrs["d"]
    assert lrs["d"] == pytest.approx(10 * lrs["f"])


def test_an_arms_run_config_is_a_valid_run_config() -> None:
    from adaptlab.config import build_config

    spec = build_spec(
        {
            **BASE,
            "arms": [
                {"name": "f", "method": "full"},
                {"name": "q", "method": "qlora", "rank": 4, "targets": "q_proj,v_proj", "rslora": True},
            ],
        }
    )
    for p in expand(spec, spec.arms):
        config = build_config(p.run_config(spec, "out"))
        arm = next(a for a in spec.arms if a.name == p.arm)
        assert config.method == arm.method_spec()
        assert config.train.batch == spec.train.batch and config.train.seq_len == spec.train.seq_len
    q = next(a for a in spec.arms if a.name == "q")
    assert q.targets == ["q_proj", "v_proj"] and q.method_spec().rslora


def test_matched_rank_is_capped_at_the_targeted_modules_dimension() -> None:
    # tiny-random: attention-only at 16 x all-linear's params would need rank 37; k_proj has 32 outputs
    spec = build_spec(
        {
            **BASE,
            "arms": [
                {"name": "lora", "method": "lora", "rank": 16},
                {"name": "attn", "method": "lora", "targets": "attention", "match_params": "lora"},
            ],
        }
    )
    arms, notes = resolve_ranks(spec)
    assert next(a for a in arms if a.name == "attn").rank == 32
    assert "capped at 32" in notes[0]


def test_demo_is_a_valid_comparison_at_its_swept_lrs() -> None:
    from adaptlab.compare import build_spec
    from adaptlab.compare.spec import DEMO_FULL_LR, demo_spec

    spec = build_spec(demo_spec(), source="demo")
    assert [a.name for a in spec.arms] == ["full", "lora", "lora-attn", "dora"]
    assert spec.train.default_lr("full") == DEMO_FULL_LR == 1e-4
    assert spec.train.default_lr("lora") == pytest.approx(1e-3)
    assert spec.train.default_lr("dora") == pytest.approx(1e-3)
    assert spec.drift and not spec.eval.target_kl


@pytest.mark.parametrize("extra", [{"study": "methods"}, {"arms": [{"name": "full", "method": "full"}]}])
def test_study_data_a_comparison_would_not_use_is_refused(extra) -> None:
    with pytest.raises(UserError, match="would not use it"):
        build_spec({**BASE, **extra, "study_data": ["b.jsonl"]})


def test_a_malformed_data_file_stops_compare_before_any_arm(run_cli, tmp_path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{bad\n')
    args = ["compare", "--model", "tiny-random", "--data", data, "--tokens", "64", "--out", tmp_path / "c"]
    code, _, err = run_cli(*args)
    assert code == 2 and f"{data}:2: malformed JSON" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_a_study_flag_with_a_config_that_lists_arms_is_refused(run_cli, tmp_path) -> None:
    cfg = write(
        tmp_path, {**BASE, "arms": [{"name": "a", "method": "lora"}, {"name": "b", "method": "full"}]}
    )
    code, _, err = run_cli("compare", "--config", cfg, "--study", "rank", "--out", tmp_path / "out")
    assert code == 2
    assert err.strip().splitlines() == [f"error: --study and a config with arms ({cfg}): choose one"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", [{"rank": 4}, {"alpha": 8.0}, {"rslora": True}, {"targets": "attention"}])
def test_a_lora_field_on_a_full_arm_is_refused_as_train_refuses_it(run_cli, tmp_path, field) -> None:
    (name,) = field
    cfg = write(tmp_path, {**BASE, "arms": [{"name": "f4", "method": "full", **field}]})
    code, _, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "out")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {cfg} field arms.0: arm f4: {name} applies to the LoRA family"), line
    assert f"drop {name}" in line


def test_a_written_spec_with_full_arms_reads_back() -> None:
    spec = build_spec({**BASE, "study": "methods", "arms": [{"name": "full", "method": "full"}]})
    dumped = spec.model_dump(mode="json")
    assert "rank" not in dumped["arms"][0]
    assert build_spec(dumped).arms[0].method == "full"


def test_an_arm_budget_below_one_optimizer_step_is_refused(run_cli, tmp_path) -> None:
    arms = [{"name": "tiny", "method": "lora", "tokens": 1}, {"name": "b", "method": "full"}]
    cfg = write(tmp_path, {**BASE, "train": {"batch": 2, "seq_len": 32}, "arms": arms})
    code, _, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "out")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {cfg} field top level: arm tiny: tokens 1 is less than one"), line
    assert "at least 64" in line
    arms[0].update(tokens=64, grad_accum=2)
    with pytest.raises(UserError, match="arm tiny: .* at least 128"):
        build_spec({**BASE, "train": {"batch": 2, "seq_len": 32}, "arms": arms})
    arms[0]["tokens"] = 128
    build_spec({**BASE, "train": {"batch": 2, "seq_len": 32}, "arms": arms})
