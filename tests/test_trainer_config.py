"""TrainConfig: every bad setting is refused before any data, model or output folder is touched, with a message
naming the flag; the CLI exits 2 without a traceback; the defaults rule; --config files."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from ddpm_from_scratch.trainer import ConfigError, TrainConfig
from ddpm_from_scratch.trainer.config import DIFFUSERS_RECIPE, DIGITS_RECIPE, parse_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")


def _train_main():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# (flags, text the one-line message must contain)
BAD = [
    (["--ddpm_num_inference_steps", "2000", "--ddpm_num_steps", "1000"], "--ddpm_num_inference_steps"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps"),
    (["--snr_gamma", "-1"], "--snr_gamma"),
    (["--snr_gamma", "0"], "--snr_gamma"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--lr_warmup_steps", "-5"], "--lr_warmup_steps"),
    (["--save_images_steps", "-1"], "--save_images_steps"),
    (["--eval_num_samples", "-5"], "--eval_num_samples"),
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit"),
    (["--max_train_steps", "0"], "--max_train_steps"),
    (["--num_epochs", "-1", "--train_data_dir", ROOT], "--num_epochs"),
    (["--save_images_epochs", "-2"], "--save_images_epochs"),
    (["--save_model_epochs", "-2"], "--save_model_epochs"),
    (["--ddpm_num_steps", "1"], "--ddpm_num_steps"),
    (["--ddpm_num_steps", "10000000", "--ddpm_num_inference_steps", "10"], "--ddpm_num_steps"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "inf"], "--learning_rate"),
    (["--ema_min_decay", "0.9", "--ema_max_decay", "0.5"], "--ema_min_decay"),
    (["--ema_max_decay", "1.0"], "--ema_max_decay"),
    (["--adam_beta1", "1.0"], "--adam_beta1"),
    (["--variance_type", "learned", "--loss", "simple"], "--allow_untrained_variance"),
    (["--loss", "hybrid"], "--loss hybrid"),
    (["--importance_sampling"], "--importance_sampling"),
    (["--mixed_precision", "fp16"], "--mixed_precision fp16"),
    (["--push_to_hub", "--hub_model_id", "not a valid id!"], "--hub_model_id"),
    (["--hub_model_id", "a/b/c"], "--hub_model_id"),
    (["--train_data_dir", "/nonexistent/images"], "--train_data_dir"),
    (["--dataset_name", "./no/such/folder"], "--dataset_name"),
    (["--model_config_name_or_path", "/nonexistent/unet"], "--model_config_name_or_path"),
    (["--unet_preset", "huge"], "--unet_preset"),
    (["--preserve_input_precision"], "--preserve_input_precision"),
    (["--enable_xformers_memory_efficient_attention"], "--enable_xformers_memory_efficient_attention"),
    (["--logger", "wandb"], "--logger wandb"),
    (["--eval_at_end", "--train_data_dir", ROOT], "--eval_at_end"),
]


@pytest.mark.parametrize("flags,expected", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_setting_is_refused_before_any_work(tmp_path, capsys, flags, expected):
    if "--mixed_precision" in flags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 is fine on a GPU")
    if "--logger" in flags and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    out = tmp_path / "out"
    start = time.perf_counter()
    rc = _train_main()(["--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2
    line = [x for x in err.splitlines() if x.startswith("train.py: error:")]
    assert len(line) == 1 and expected in line[0], err
    assert "Traceback" not in err
    assert not out.exists()  # no output folder, data or model was touched
    assert time.perf_counter() - start < 60  # seconds, not a training run (generous: shared CPU)


def test_push_to_hub_without_a_usable_token_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc = _train_main()(["--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/model"])
    assert rc == 2 and "--push_to_hub" in capsys.readouterr().err
    # a token, but the Hub cannot be reached (offline): still refused now, not after training
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a" * 30)
    rc = _train_main()(["--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/model"])
    assert rc == 2 and "--push_to_hub" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_refused(tmp_path):
    if os.geteuid() == 0:
        locked = tmp_path / "file"
        locked.write_text("x")  # root can write anywhere: a file in the way is the unwritable case
        problems = TrainConfig(output_dir=str(locked / "out")).resolved().problems()
    else:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        problems = TrainConfig(output_dir=str(locked / "out")).resolved().problems()
    assert any("--output_dir" in p for p in problems), problems


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        TrainConfig(checkpointing_steps=-1, snr_gamma=-1.0, learning_rate=-1.0).validate()
    text = str(info.value)
    assert "\n" not in text
    for flag in ("--checkpointing_steps", "--snr_gamma", "--learning_rate"):
        assert flag in text


@pytest.mark.parametrize("argv,expected", [
    (["--checkpointing_steps", "-1"], "--checkpointing_steps"),  # our validation
    (["--loss", "nope"], "--loss"),  # argparse's choices
    (["--no_such_flag"], "--no_such_flag"),  # unknown flag
])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, argv, expected):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(tmp_path / "out"), *argv], env=env,
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and expected in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_defaults_rule_digits_recipe_vs_diffusers_recipe():
    digits = TrainConfig().resolved()
    for key, value in DIGITS_RECIPE.items():
        if value is not None:
            assert getattr(digits, key) == value, key
    assert digits.num_epochs is None and digits.save_images_epochs is None
    mine = TrainConfig(train_data_dir="imgs").resolved()
    for key, value in DIFFUSERS_RECIPE.items():
        assert getattr(mine, key) == value, key
    # diffusers' example defaults, read from its argparse definitions (v0.40.0)
    assert (mine.adam_beta1, mine.adam_weight_decay, mine.ema_max_decay, mine.learning_rate,
            mine.lr_warmup_steps, mine.use_ema, mine.train_batch_size, mine.eval_batch_size, mine.resolution,
            mine.center_crop, mine.num_epochs, mine.save_images_epochs, mine.save_model_epochs,
            mine.mixed_precision, mine.output_dir) == (0.95, 1e-6, 0.9999, 1e-4, 500, False, 16, 16, 64, False, 100,
                                                       10, 10, "no", "ddpm-model-64")
    # an explicit value always wins over the recipe
    explicit = TrainConfig(train_data_dir="imgs", learning_rate=3e-4, use_ema=True, max_train_steps=5).resolved()
    assert explicit.learning_rate == 3e-4 and explicit.use_ema is True and explicit.num_epochs is None


def test_cli_flags_and_config_file(tmp_path):
    cfg = parse_cli(["--use_ema", "--center_crop", "--random_flip", "--learning_rate=1e-4"])
    assert cfg.use_ema is True and cfg.center_crop is True and cfg.random_flip is True and cfg.learning_rate == 1e-4
    cfg = parse_cli(["--no-use_ema", "--no-center_crop"])  # today's spelling keeps working
    assert cfg.use_ema is False and cfg.center_crop is False
    assert parse_cli([]).use_ema is None  # the recipe decides
    (tmp_path / "c.yaml").write_text("learning_rate: 0.0005\nmax_train_steps: 7\nuse_ema: false\n")
    cfg = parse_cli(["--config", str(tmp_path / "c.yaml"), "--max_train_steps", "9"])
    assert cfg.learning_rate == 5e-4 and cfg.use_ema is False and cfg.max_train_steps == 9  # the flag wins
    (tmp_path / "c.json").write_text(json.dumps({"seed": 3, "loss": "vlb", "variance_type": "learned_range"}))
    cfg = parse_cli(["--config", str(tmp_path / "c.json")])
    assert (cfg.seed, cfg.loss, cfg.variance_type) == (3, "vlb", "learned_range")
    cfg.validate()
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(SystemExit) as info:
        parse_cli(["--config", str(tmp_path / "bad.json")])
    assert info.value.code == 2


def test_every_diffusers_example_flag_exists():
    """Every flag of diffusers' train_unconditional.py (v0.40.0) is a TrainConfig field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    diffusers_flags = {
        "dataset_name", "dataset_config_name", "model_config_name_or_path", "train_data_dir", "output_dir",
        "overwrite_output_dir", "cache_dir", "resolution", "center_crop", "random_flip", "train_batch_size",
        "eval_batch_size", "dataloader_num_workers", "num_epochs", "save_images_epochs", "save_model_epochs",
        "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1",
        "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay",
        "push_to_hub", "hub_token", "hub_model_id", "hub_private_repo", "logger", "logging_dir", "local_rank",
        "mixed_precision", "prediction_type", "ddpm_num_steps", "ddpm_num_inference_steps", "ddpm_beta_schedule",
        "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
        "enable_xformers_memory_efficient_attention", "preserve_input_precision"}
    assert diffusers_flags - names == set()
