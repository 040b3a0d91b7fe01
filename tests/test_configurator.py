"""configurator.py: flags, config files, types, suggestions, help. Run: python -m pytest -q tests/test_configurator.py"""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from configurator import UserError, apply_overrides, config_keys, help_text

# A miniature stage script: the same shape as train_base.py's config block (globals with trailing comments,
# an import and a helper that must not count as keys, a None default declared in _types).
STAGE_SOURCE = '''\
"""fake_stage.py: a stand-in stage script for the configurator tests."""
import os
depth = 12  # the one size dial: n_layer
device_batch_size = 4  # sequences per device per micro-step
total_batch_size = 131072  # tokens per optimizer step over all ranks
max_seq_len = 1024  # tokens per sequence
max_lr = 6e-4  # peak learning rate of the AdamW groups
warmup_steps = 0  # linear warmup length in steps
eval_every = 100  # steps between evaluations, -1 = off
compile = True  # torch.compile the model
auto_resume = False  # resume from LATEST if it exists
resume = False  # resume from checkpoint_path
checkpoint_path = ""  # checkpoint file for --resume
run_name = "dev"  # name in logs and wandb
permanent_checkpoints = ""  # comma-separated steps never deleted
peak_flops = None  # FLOP/s per device, None = look up the table
resume_step = None
_types = {"peak_flops": float}
def helper():
    return 1
'''


def make_stage(tmp_path, extra=""):
    """The globals() a stage script has when it calls apply_overrides."""
    path = tmp_path / "fake_stage.py"
    path.write_text(STAGE_SOURCE + extra, encoding="utf-8")
    g = {"__file__": str(path), "__name__": "__main__"}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), g)
    return g


@pytest.fixture
def g(tmp_path):
    return make_stage(tmp_path)


def user_error(g, argv, types=None):
    """Run apply_overrides expecting a UserError; return its message."""
    with pytest.raises(UserError) as info:
        apply_overrides(g, argv, types)
    return str(info.value)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# ---- keys and the returned config ----

def test_config_keys_are_scalar_public_globals(g):
    keys = config_keys(g)
    assert "depth" in keys and "peak_flops" in keys        # None default declared in _types
    for not_key in ("os", "helper", "_types", "__file__", "resume_step"):
        assert not_key not in keys                          # module, function, private, undeclared None
    assert list(keys) == sorted(keys)


def test_returns_sorted_effective_config_and_writes_back(g):
    cfg = apply_overrides(g, ["--depth=4", "--max_lr=1e-3"])
    assert list(cfg) == sorted(cfg)
    assert g["depth"] == cfg["depth"] == 4
    assert g["max_lr"] == cfg["max_lr"] == pytest.approx(1e-3)
    assert cfg["device_batch_size"] == 4                   # untouched keys keep their defaults


def test_no_args_changes_nothing(g):
    before = config_keys(g)
    assert apply_overrides(g, []) == before


# ---- argv forms ----

def test_value_splits_on_first_equals(g):
    apply_overrides(g, ["--run_name=a=b=c"])
    assert g["run_name"] == "a=b=c"


def test_key_space_value(g):
    # the nanoGPT guide's form: --max_steps 40000 --batch_size 16 (ours: device_batch_size)
    apply_overrides(g, ["--device_batch_size", "16", "--max_lr", "3e-4"])
    assert g["device_batch_size"] == 16 and g["max_lr"] == pytest.approx(3e-4)


def test_negative_value_after_space(g):
    apply_overrides(g, ["--eval_every", "-1"])
    assert g["eval_every"] == -1


def test_leading_double_dash_is_skipped(g):
    # torchrun --standalone --nproc_per_node=4 train_base.py -- --device_batch_size=2
    apply_overrides(g, ["--", "--device_batch_size=2"])
    assert g["device_batch_size"] == 2


def test_missing_value_is_reported(g):
    msg = user_error(g, ["--max_lr"])
    assert "--max_lr needs a value" in msg and "--max_lr=" in msg


def test_single_dash_option_is_rejected(g):
    msg = user_error(g, ["-lr", "3e-4"])
    assert "'-lr'" in msg and "two dashes" in msg


# ---- bools ----

def test_bare_bool_flag_means_true(g):
    apply_overrides(g, ["--auto_resume", "--depth=2"])
    assert g["auto_resume"] is True and g["depth"] == 2


@pytest.mark.parametrize("word,expected", [("True", True), ("true", True), ("1", True),
                                           ("False", False), ("false", False), ("0", False)])
def test_bool_spellings(g, word, expected):
    g["compile"] = not expected
    apply_overrides(g, [f"--compile={word}"])
    assert g["compile"] is expected
    g["compile"] = not expected
    apply_overrides(g, ["--compile", word])            # space form takes the same words
    assert g["compile"] is expected


def test_bad_bool_word(g):
    msg = user_error(g, ["--compile=yes"])
    assert "--compile expects bool, got 'yes'" in msg and "True/False" in msg


def test_bool_flag_does_not_swallow_a_config_file(g, tmp_path):
    path = write(tmp_path, "c.json", '{"depth": 3}')
    apply_overrides(g, ["--compile", path])
    assert g["compile"] is True and g["depth"] == 3


# ---- numbers and text ----

def test_int_accepted_for_float_key(g):
    apply_overrides(g, ["--max_lr=0"])
    assert g["max_lr"] == 0.0 and type(g["max_lr"]) is float


@pytest.mark.parametrize("text", ["1.5", "3e-4"])
def test_float_rejected_for_int_key(g, text):
    msg = user_error(g, [f"--depth={text}"])
    assert f"--depth expects int, got '{text}'" in msg
    assert g["depth"] == 12                                  # nothing written on error


def test_integral_float_for_int_key_names_the_fix(g):
    msg = user_error(g, ["--total_batch_size=5e5"])
    assert "expects int" in msg and "500000" in msg


def test_wrong_type_message(g):
    assert user_error(g, ["--max_lr=abc"]).startswith("--max_lr expects float, got 'abc'")


def test_bool_is_not_an_int(g):
    assert "--depth expects int, got 'True'" in user_error(g, ["--depth=True"])


def test_str_key_takes_raw_text(g):
    apply_overrides(g, ["--run_name=123", "--permanent_checkpoints", "10000,20000,30000"])
    assert g["run_name"] == "123" and g["permanent_checkpoints"] == "10000,20000,30000"


def test_none_default_with_types(g):
    apply_overrides(g, ["--peak_flops=65e12"])
    assert g["peak_flops"] == pytest.approx(65e12) and type(g["peak_flops"]) is float
    apply_overrides(g, ["--peak_flops=None"])
    assert g["peak_flops"] is None
    assert "--peak_flops expects float, got 'fast'" in user_error(g, ["--peak_flops=fast"])


def test_types_argument_declares_none_keys(g):
    apply_overrides(g, ["--resume_step=500"], types={"resume_step": int})
    assert g["resume_step"] == 500


def test_undeclared_none_key_says_to_declare_it(g):
    msg = user_error(g, ["--resume_step=500"])
    assert "'resume_step'" in msg and "_types" in msg


# ---- unknown keys ----

@pytest.mark.parametrize("theirs,ours", [
    ("batch_size", "device_batch_size"), ("batch_size_per_gpu", "device_batch_size"),
    ("eval_interval", "eval_every"), ("val_interval", "eval_every"),
    ("learning_rate", "max_lr"), ("learn_rate", "max_lr"), ("lr", "max_lr"),
    ("block_size", "max_seq_len"), ("n_layer", "depth"), ("warmup_iters", "warmup_steps"),
])
def test_guide_names_suggest_ours(g, theirs, ours):
    msg = user_error(g, [f"--{theirs}", "16"])
    assert f"unknown config key '{theirs}'" in msg
    assert f"did you mean '{ours}'?" in msg and f"--{ours}=16" in msg
    assert theirs not in config_keys(g)                      # suggested, never accepted


def test_grad_accum_alias_prefers_a_real_key(tmp_path):
    # a stage with grad_accum_steps gets it; one without gets total_batch_size and why
    with_key = make_stage(tmp_path, "grad_accum_steps = 1  # micro-steps per optimizer step\n")
    assert "did you mean 'grad_accum_steps'?" in user_error(with_key, ["--gradient_accumulation_steps=4"])
    msg = user_error(make_stage(tmp_path), ["--gradient_accumulation_steps=4"])
    assert "did you mean 'total_batch_size'?" in msg and "grad accumulation" in msg


def test_alias_target_missing_falls_back_to_difflib(g):
    # our fake stage has no num_epochs, so 'epochs' must not suggest it
    msg = user_error(g, ["--epochs=5"])
    assert "num_epochs" not in msg and "unknown config key 'epochs'" in msg


@pytest.mark.parametrize("typo,ours", [("max_lrr", "max_lr"), ("dpeth", "depth"), ("max-lr", "max_lr"),
                                       ("learning_rat", "max_lr"), ("no_compile", "compile")])
def test_typos_suggest_closest(g, typo, ours):
    assert f"did you mean '{ours}'?" in user_error(g, [f"--{typo}=1"])


def test_no_compile_suggests_false(g):
    assert "--compile=False" in user_error(g, ["--no_compile"])


def test_nothing_similar_points_to_help(g):
    msg = user_error(g, ["--zzzzqqq=1"])
    assert "'zzzzqqq'" in msg and "--help" in msg


def test_torchrun_option_after_script(g):
    msg = user_error(g, ["--nproc_per_node=4"])
    assert "torchrun option" in msg and "fake_stage.py" in msg


def test_all_problems_reported_at_once_and_nothing_written(g):
    msg = user_error(g, ["--depth=2", "--batch_size", "16", "--eval_interval", "50", "--max_lr=abc"])
    assert msg.startswith("3 problems")
    assert "device_batch_size" in msg and "eval_every" in msg and "--max_lr expects float" in msg
    assert g["depth"] == 12                                  # the valid override was not applied either


# ---- --resume ----

@pytest.mark.parametrize("argv", [["--resume=out/ckpt_000500.pt"], ["--resume", "out/ckpt_000500.pt"],
                                  ["--resume", "--checkpoint_path", "out/ckpt_000500.pt"],
                                  ["--resume=true", "--checkpoint_path=out/ckpt_000500.pt"]])
def test_resume_forms(g, argv):
    cfg = apply_overrides(g, argv)
    assert cfg["resume"] is True and cfg["checkpoint_path"] == "out/ckpt_000500.pt"


def test_bare_resume(g):
    cfg = apply_overrides(g, ["--resume"])
    assert cfg["resume"] is True and cfg["checkpoint_path"] == ""


def test_resume_false_is_a_bool(g):
    g["resume"] = True
    assert apply_overrides(g, ["--resume=0"])["resume"] is False


def test_positional_checkpoint_hints_resume(g):
    msg = user_error(g, ["log/model_20000.pt"])
    assert "not found" in msg and "--resume log/model_20000.pt" in msg


# ---- config files ----

def test_py_config_file(g, tmp_path):
    path = write(tmp_path, "t4.py", """
        import math
        depth = 6
        max_lr = 1  # an int is fine for a float key
        run_name = "t4-" + str(depth)
        def unused():
            return math.pi
    """)
    apply_overrides(g, [path])
    assert g["depth"] == 6 and g["max_lr"] == 1.0 and g["run_name"] == "t4-6"


def test_py_config_typo_is_caught(g, tmp_path):
    path = write(tmp_path, "t4.py", "depth = 6\nmax_lrr = 1e-3\n")
    msg = user_error(g, [path])
    assert "unknown config key 'max_lrr'" in msg and "t4.py" in msg and "'max_lr'" in msg
    assert g["depth"] == 12


def test_py_config_that_crashes(g, tmp_path):
    path = write(tmp_path, "bad.py", "depth = 1 / 0\n")
    msg = user_error(g, [path])
    assert "bad.py" in msg and "ZeroDivisionError" in msg


def test_flags_override_files_whatever_the_order(g, tmp_path):
    path = write(tmp_path, "c.py", "depth = 6\nmax_lr = 1e-3\n")
    apply_overrides(g, ["--depth=8", path])
    assert g["depth"] == 8 and g["max_lr"] == pytest.approx(1e-3)


def test_json_nested_is_flattened(g, tmp_path):
    path = write(tmp_path, "c.json", json.dumps(
        {"model": {"depth": 6}, "training": {"max_lr": 2e-4, "compile": False},
         "permanent_checkpoints": [10000, 20000]}))
    apply_overrides(g, [path])
    assert g["depth"] == 6 and g["max_lr"] == pytest.approx(2e-4) and g["compile"] is False
    assert g["permanent_checkpoints"] == "10000,20000"       # a list for a str key joins with commas


def test_json_wrong_type_names_file_and_key(g, tmp_path):
    path = write(tmp_path, "c.json", '{"training": {"depth": 2.5}}')
    msg = user_error(g, [path])
    assert "training.depth" in msg and "c.json" in msg and "expects int" in msg


def test_yaml_guide_template_gets_suggestions(g, tmp_path):
    # the multi-GPU guide's single-GPU template, verbatim
    path = write(tmp_path, "train_config.yaml", """
        data:
          batch_size: 16

        training:
          learning_rate: 1e-4
          warmup_steps: 1000
          gradient_accumulation_steps: 1
          val_interval: 1000
    """)
    msg = user_error(g, ["--config", path])
    for theirs, ours in [("batch_size", "device_batch_size"), ("learning_rate", "max_lr"),
                         ("gradient_accumulation_steps", "total_batch_size"), ("val_interval", "eval_every")]:
        assert f"unknown config key '{theirs}'" in msg and f"rename it to '{ours}'" in msg
    assert "data.batch_size" in msg and "training.learning_rate" in msg
    assert "warmup_steps" not in msg                          # ours already: no complaint


def test_yaml_nested_with_our_names(g, tmp_path):
    # YAML 1.1 reads `1e-4` (no dot) as a string; a float key still gets the number
    path = write(tmp_path, "ours.yml", """
        data:
          device_batch_size: 16
        training:
          max_lr: 1e-4
          eval_every: 50
          auto_resume: true
    """)
    apply_overrides(g, [f"--config={path}"])
    assert g["device_batch_size"] == 16 and g["max_lr"] == pytest.approx(1e-4)
    assert g["eval_every"] == 50 and g["auto_resume"] is True


def test_yaml_same_leaf_twice_conflicts(g, tmp_path):
    path = write(tmp_path, "c.yaml", "a:\n  depth: 4\nb:\n  depth: 6\n")
    msg = user_error(g, [path])
    assert "'depth' twice" in msg and "a.depth" in msg and "b.depth" in msg


def test_yaml_must_be_a_mapping(g, tmp_path):
    path = write(tmp_path, "c.yaml", "- depth\n- 4\n")
    assert "mapping" in user_error(g, [path])


def test_config_file_problems(g, tmp_path):
    assert "not found" in user_error(g, [str(tmp_path / "nope.yaml")])
    assert "--max_lr=3e-4" in user_error(g, ["max_lr=3e-4"])          # a forgotten --
    toml = write(tmp_path, "c.toml", "depth = 4\n")
    assert "unsupported" in user_error(g, [toml]) and ".yaml" in user_error(g, [toml])
    bad = write(tmp_path, "c.json", "{depth: 4")
    assert "not valid JSON" in user_error(g, [bad])
    assert "--config needs a path" in user_error(g, ["--config"])


# ---- help ----

def test_help_lists_keys_defaults_and_comments(g, capsys):
    with pytest.raises(SystemExit) as info:
        apply_overrides(g, ["--depth=4", "-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "fake_stage.py: a stand-in stage script" in out
    for line_part in ["--depth=12", "# the one size dial: n_layer", "--max_lr=0.0006",
                      "# peak learning rate of the AdamW groups", "--peak_flops=None", "--checkpoint_path=''"]:
        assert line_part in out
    assert "--helper" not in out and "--os" not in out and "--_types" not in out
    # source order, as the script reads
    assert out.index("--depth=") < out.index("--device_batch_size=") < out.index("--peak_flops=")
    assert g["depth"] == 12                                   # help applies nothing


def test_help_without_source_file_still_lists_keys(g):
    g["__file__"] = None
    text = help_text(g)
    assert "--depth=12" in text and "#" not in text.split("Keys and defaults:")[1]


def test_help_as_a_real_script(tmp_path):
    # one end-to-end run: `python stage.py --help` exits 0 (stage scripts turn UserError into exit 2)
    script = tmp_path / "stage.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + STAGE_SOURCE +
                      "from configurator import apply_overrides\napply_overrides(globals(), sys.argv[1:])\n",
                      encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "# sequences per device per micro-step" in done.stdout


def test_a_config_class_is_refused_with_its_fields_spelled_out(g, tmp_path):
    # the large-dataset guide's TrainConfigPretrainLarge: ignoring it silently would train on the defaults
    cfg = write(tmp_path, "config.py", "class TrainConfigPretrainLarge:\n    max_seq_len: int = 192\n"
                                       "    device_batch_size: int = 32\n")
    msg = user_error(g, [str(cfg)])
    assert "class TrainConfigPretrainLarge" in msg and "max_seq_len = 192" in msg and "device_batch_size = 32" in msg
    assert g["max_seq_len"] == 1024  # nothing applied


@pytest.mark.parametrize("key, says", [("log_level", "log_every"), ("use_large_config", "config/large_dataset.py"),
                                       ("num_workers", "background thread"), ("model_parallel", "DDP")])
def test_guide_keys_without_an_equivalent_say_what_to_do_instead(g, key, says):
    msg = user_error(g, [f"--{key}=1"])
    assert "not a setting here" in msg and says in msg and "did you mean" not in msg


def test_sft_accumulation_and_data_path_point_to_its_own_keys(tmp_path):
    g = make_stage(tmp_path, "target_examples_per_step = 32  # conversations per step\n"
                             "mixture = ''  # conversation files\n")
    g.pop("total_batch_size")
    msg = user_error(g, ["--gradient_accumulation_steps=64", "--data_path=smol.json"])
    assert "'target_examples_per_step'" in msg and "device_batch_size=1 with accumulation 64" in msg
    assert "'mixture'" in msg
