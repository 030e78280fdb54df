"""Config loading, profile overlays, --set overrides, and each kind of config error."""
from __future__ import annotations

import textwrap

import pytest

from workspace.config import ConfigError, PipelineConfig, config_hash, load_config, parse_override


def write(tmp_path, text: str, name: str = "pipeline.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_shipped_config_loads_with_default_profile():
    loaded = load_config()
    assert loaded.profile == "cpu_tiny"
    assert loaded.sources == ("configs/pipeline.yaml", "configs/profiles/cpu_tiny.yaml")
    cfg = loaded.config
    assert cfg.finetune.method == "lora" and cfg.finetune.quantization_bit is None  # measured: docs/BENCHMARKS.md
    assert cfg.finetune.lora_rank == 64 and cfg.finetune.lora_alpha == 128
    assert cfg.hub.enabled is False
    assert cfg.base_model.source == "build"


@pytest.mark.parametrize("profile", ["cpu_tiny", "rtx3090x2_qwen14b_qlora", "a100x1_qwen32b_qlora"])
def test_every_shipped_profile_validates(profile):
    cfg = load_config(profile=profile).config
    assert cfg.profile == profile


def test_profile_overlays_pipeline_file():
    cfg = load_config(profile="rtx3090x2_qwen14b_qlora").config
    assert cfg.serving.tensor_parallel_size == 2
    assert cfg.base_model.hub_id == "Qwen/Qwen2.5-14B-Instruct"
    assert cfg.finetune.lora_rank == 64  # from pipeline.yaml, untouched by the profile


def test_set_overrides_parse_values_and_win_over_profile():
    loaded = load_config(overrides=["finetune.lora_rank=16", "finetune.max_steps=5", "rag.mode=dense",
                                    "eval.kobest_tasks=[kobest_boolq]"])
    cfg = loaded.config
    assert cfg.finetune.lora_rank == 16 and cfg.finetune.max_steps == 5
    assert cfg.rag.mode == "dense" and cfg.eval.kobest_tasks == ["kobest_boolq"]
    assert loaded.sources[-1] == "--set eval.kobest_tasks=[kobest_boolq]"


def test_config_hash_is_stable_and_tracks_changes():
    a, b = load_config(), load_config()
    assert a.hash == b.hash and len(a.hash) == 16
    assert load_config(overrides=["finetune.lora_rank=16"]).hash != a.hash
    assert config_hash(PipelineConfig()) == config_hash(PipelineConfig())


def test_misspelled_key_names_key_file_and_closest_valid_key(tmp_path):
    path = write(tmp_path, """
        profile: cpu_tiny
        finetune:
          lora_rnak: 16
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "finetune.lora_rnak" in msg
    assert "Did you mean 'lora_rank'?" in msg


def test_misspelled_section_is_reported(tmp_path):
    path = write(tmp_path, "finetun:\n  lora_rank: 16\n")
    with pytest.raises(ConfigError, match=r"unknown key 'finetun'.*Did you mean 'finetune'\?"):
        load_config(path)


def test_wrong_type_names_path_value_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["finetune.lora_rank=abc"])
    msg = str(err.value)
    assert "--set finetune.lora_rank=abc" in msg and 'finetune.lora_rank = "abc"' in msg and "valid integer" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"finetune.method = \"qlorra\".*'qlora', 'lora' or 'full'"):
        load_config(overrides=["finetune.method=qlorra"])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"serving.port = 70000.*less than or equal to 65535"):
        load_config(overrides=["serving.port=70000"])


def test_cross_key_rule_names_all_contributing_sources():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["finetune.method=qlora"])
    msg = str(err.value)
    assert "method 'qlora' needs quantization_bit 4 or 8" in msg
    assert "configs/profiles/cpu_tiny.yaml" in msg and "--set finetune.method=qlora" in msg


def test_hub_model_without_hub_access_is_refused():
    with pytest.raises(ConfigError, match="hub.enabled is false"):
        load_config(overrides=["base_model.source=hub", "base_model.hub_id=Qwen/Qwen2.5-7B"])


def test_unknown_profile_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"profile 'cpu_tiy'.*Did you mean 'cpu_tiny'\?"):
        load_config(profile="cpu_tiy")


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "finetune: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("finetune.lora_rank")
    with pytest.raises(ConfigError, match="empty key segment"):
        parse_override("finetune..lora_rank=3")


def test_config_is_frozen():
    cfg = load_config().config
    with pytest.raises(Exception):
        cfg.finetune.lora_rank = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, message", [
    ("finetune.lora_rank=true", r"--set finetune.lora_rank=true: finetune.lora_rank: expected a number, got a boolean \(true\)"),
    ("finetune.learning_rate=false", r"finetune.learning_rate: expected a number, got a boolean \(false\)"),
    ("serving.bench.concurrency=[1, true]", r"serving.bench.concurrency: expected a number, got a boolean"),
    ("finetune.max_steps=0", r"finetune.max_steps: 0 steps trains nothing: use a positive number, or -1"),
])
def test_booleans_for_numbers_and_zero_steps_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])
    assert load_config(overrides=["finetune.max_steps=-1", "finetune.bf16=true"]).config.finetune.max_steps == -1


@pytest.mark.parametrize("profile", ["cpu_tiny", "cpu_smoke", "rtx3090x2_qwen14b_qlora", "a100x1_qwen32b_qlora"])
def test_with_values_of_nothing_is_the_same_config(profile):
    loaded = load_config(profile=profile)
    again = loaded.with_values("nothing", {})
    assert again.hash == loaded.hash and again.config == loaded.config
    assert again.sources == loaded.sources + ("nothing",)


def test_with_values_lays_typed_values_over_and_names_their_source():
    loaded = load_config(overrides=["finetune.lora_rank=16"])
    run = loaded.with_values("the loop's settings", {"finetune.learning_rate": 1.2345678e-5, "data.feedback.enabled": True,
                                                    "finetune.stage": "dpo"})
    cfg = run.config
    assert cfg.finetune.learning_rate == 1.2345678e-5  # as given: no float formatted into --set text and back
    assert cfg.finetune.stage == "dpo" and cfg.data.feedback.enabled is True
    assert cfg.finetune.lora_rank == 16 and run.origin("finetune.lora_rank") == "--set finetune.lora_rank=16"
    assert run.origin("finetune.stage") == "the loop's settings"
    assert loaded.config.finetune.stage == "sft"  # the original is untouched


def test_with_values_validates_again_across_sections_and_keys():
    loaded = load_config()
    with pytest.raises(ConfigError, match="the loop's settings: .*set data.feedback.enabled: true"):
        loaded.with_values("the loop's settings", {"finetune.stage": "dpo"})  # DPO without the harvested pairs
    with pytest.raises(ConfigError, match="the loop's settings: unknown key 'finetune.learning_rat'.*Did you mean "
                                          "'learning_rate'"):
        loaded.with_values("the loop's settings", {"finetune.learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="the loop's settings: finetune.max_steps: 0 steps trains nothing"):
        loaded.with_values("the loop's settings", {"finetune.max_steps": 0})
