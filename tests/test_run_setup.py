"""engine/run_setup.py config checks through ``training.py``'s command line: bad values and keys that cannot act
are refused before any file is read or written (one ``error:`` line naming both keys, exit 2); a key a named config
sets is a warning and the run goes on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.run_setup import KEY_CONFLICTS, check_key_conflicts
from tests.reliability_fixtures import TINY32, cli
from util.cli import EXIT_USER_ERROR
from util.errors import ConfigError

# (key, cause) of a KEY_CONFLICTS pair -> (WORLD_SIZE, updates after `with demo`, text the error must hold). The demo
# config trains lite_gn_s on the CPU with a cosine schedule, lr_milestones=[] and setting 1.
PAIR_CASES: dict[tuple[str, str], tuple[int, list[str], str]] = {
    ("lr_milestones", "lr_schedule"): (1, ["lr_schedule=poly", "lr_milestones=[5]"],
                                       "lr_milestones=[5] cannot act with lr_schedule='poly'"),
    ("lr_step_gamma", "lr_schedule"): (1, ["lr_step_gamma=0.5"],
                                       "lr_step_gamma=0.5 cannot act with lr_schedule='cosine'"),
    ("lr_step_gamma", "lr_milestones"): (1, ["lr_schedule=step", "lr_step_gamma=0.5"],
                                         "lr_step_gamma=0.5 cannot act with lr_milestones=[]"),
    ("optim.momentum", "optim_type"): (1, ["optim_type=adamw", "optim.momentum=0.5"],
                                       "optim.momentum=0.5 cannot act with optim_type='adamw'"),
    ("wce_bg_weight", "use_wce"): (1, ["use_wce=False", "wce_bg_weight=0.1"],
                                   "wce_bg_weight=0.1 cannot act with use_wce=False"),
    ("border_fill", "which_aug"): (1, ["which_aug=none", "border_fill=min"],
                                   "border_fill='min' cannot act with which_aug='none'"),
    ("aug_parity", "which_aug"): (1, ["which_aug=none", "aug_parity=True"],
                                  "aug_parity=True cannot act with which_aug='none'"),
    ("exclusion_rule", "exclude_cls_list"): (1, ["exclusion_rule=all"],
                                             "exclusion_rule='all' cannot act with exclude_cls_list=[]"),
    ("multishot_proto", "n_shots"): (1, ["multishot_proto=pooled"],
                                     "multishot_proto='pooled' cannot act with n_shots=1"),
    ("gpu_id", "device"): (1, ["gpu_id=1"], "gpu_id=1 cannot act with device='cpu'"),
    ("gpu_id", "WORLD_SIZE"): (2, ["device=auto", "gpu_id=1"], "gpu_id=1 cannot act with WORLD_SIZE=2"),
    ("sync_bn", "WORLD_SIZE"): (1, ["modelname=dlfcn_res50", "use_coco_init=False", "sync_bn=True"],
                                "sync_bn=True cannot act with WORLD_SIZE=1"),
    ("sync_bn", "modelname"): (2, ["sync_bn=True"], "sync_bn=True cannot act with modelname='lite_gn_s'"),
    ("use_coco_init", "backbone_weights"): (1, ["use_coco_init=True", "backbone_weights=enc.pth"],
                                            "use_coco_init=True cannot act with backbone_weights='enc.pth'"),
    ("use_coco_init", "reload_model_path"): (1, ["use_coco_init=True", "reload_model_path=start.pth"],
                                             "use_coco_init=True cannot act with reload_model_path='start.pth'"),
    ("resume", "resume_from"): (1, ["resume=True", "resume_from=old_run"],
                                "resume=True cannot act with resume_from='old_run'"),
    ("reload_model_path", "resume_from"): (1, ["reload_model_path=start.pth", "resume_from=old_run"],
                                           "reload_model_path='start.pth' cannot act with resume_from='old_run'"),
    ("path.log_dir", "use_file_observer"): (1, ["use_file_observer=False", "path.log_dir=records"],
                                            "path.log_dir='records' cannot act with use_file_observer=False"),
    ("exp_prefix", "use_file_observer"): (1, ["use_file_observer=False", "exp_prefix=mine"],
                                          "exp_prefix='mine' cannot act with use_file_observer=False"),
}


def test_every_pair_of_the_table_has_a_case() -> None:
    assert {(p.key, p.cause) for p in KEY_CONFLICTS} == set(PAIR_CASES)


@pytest.mark.parametrize("pair", sorted(PAIR_CASES), ids=lambda p: f"{p[0]}-{p[1]}")
def test_a_key_that_cannot_act_is_refused_before_any_work(pair: tuple[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    world, updates, message = PAIR_CASES[pair]
    if world > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world))  # as torchrun sets it; the check runs before the process group
    missing = tmp_path / "no_data"  # a run that got past the check would fail on the data instead
    run_dir = tmp_path / "run"
    code = cli("training.py", ["use_file_observer=False", *updates, f"data_dir={missing}", f"run_dir={run_dir}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]
    assert not run_dir.exists()  # refused before the run folder was made


def test_conflicts_of_the_user_are_errors_of_named_configs_warnings_of_defaults_nothing() -> None:
    config = {"lr_schedule": "cosine", "lr_milestones": [10], "lr_step_gamma": 0.95, "optim_type": "sgd",
              "optim": {"lr": 0.1, "momentum": 0.9}, "use_wce": True, "wce_bg_weight": 0.05, "which_aug": "sabs_aug",
              "border_fill": "zero_normalised", "aug_parity": False, "exclude_cls_list": [2], "exclusion_rule": "any",
              "n_shots": 1, "multishot_proto": "per_shot", "device": "auto", "gpu_id": 0, "sync_bn": False,
              "modelname": "dlfcn_res101", "use_coco_init": True, "backbone_weights": None,
              "reload_model_path": None, "resume": False, "resume_from": None, "use_file_observer": True,
              "path": {"log_dir": "runs"}, "exp_prefix": "x"}
    # defaults that cannot act (milestones and gamma under cosine, per_shot with one shot): no message
    assert check_key_conflicts(config, updated_keys=["lr_schedule"]) == []
    warned = check_key_conflicts(config, updated_keys=["lr_schedule"], named_keys=["lr_milestones"])
    assert warned == ["lr_milestones=[10] cannot act with lr_schedule='cosine': cosine and poly decay smoothly over "
                      "n_steps, without milestones (set by a named config; ignored)"]
    with pytest.raises(ConfigError) as err:
        check_key_conflicts(config, updated_keys=["lr_milestones", "lr_step_gamma"])
    assert str(err.value).startswith("lr_milestones=[10] cannot act with lr_schedule='cosine'")
    assert "; lr_step_gamma=0.95 cannot act with lr_schedule='cosine'" in str(err.value)
    # an inert value (an empty milestone list) is never reported, even when the user sets it
    assert check_key_conflicts({**config, "lr_milestones": []}, updated_keys=["lr_milestones"]) == []
    # the blocking key decides: under the step schedule the milestones act
    assert check_key_conflicts({**config, "lr_schedule": "step"}, updated_keys=["lr_milestones"]) == []


def test_a_named_config_key_that_cannot_act_is_a_warning_and_the_run_goes_on(
        tiny_phantom: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = tmp_path / "recipe.json"  # Sacred reads a config file given after `with` as a named config
    recipe.write_text(json.dumps({"lr_milestones": [2]}))
    updates = [u for u in TINY32 if not u.startswith(("lr_milestones=", "lr_schedule="))]  # the demo's cosine
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code = cli("training.py", [str(recipe), *updates, f"data_dir={tiny_phantom}", f"run_dir={run_dir}"])
    assert code == 0
    assert (run_dir / "snapshots" / "4.pth").is_file()
    assert "lr_milestones=[2] cannot act with lr_schedule='cosine': cosine and poly decay smoothly over n_steps, " \
           "without milestones (set by a named config; ignored)" in caplog.text


@pytest.mark.parametrize(("updates", "message"), [
    (["modelname=lite_gn", "use_coco_init=True"],
     "error: use_coco_init=True: modelname='lite_gn' has no COCO weights; pass use_coco_init=False (random init) or "
     "backbone_weights=<file>"),
    (["build_unused_aspp=True"], "error: build_unused_aspp=True: modelname='lite_gn_s' has no ASPP head"),
    (["optim_type=adam"], "error: optim_type='adam': choose one of ['sgd', 'adamw']"),
    (["amp=fp8"], "error: amp='fp8': choose one of ['off', 'bf16', 'fp16']"),
])
def test_values_a_training_cannot_use_are_refused_before_any_work(updates: list[str], message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    code = cli("training.py", ["use_file_observer=False", *updates, f"data_dir={tmp_path / 'no_data'}",
                               f"run_dir={run_dir}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not run_dir.exists()
