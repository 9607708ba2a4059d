"""--resume with a damaged newest checkpoint (a torn copy, a full disk): it is named and skipped, the
newest intact one is resumed from (bit for bit as if nothing had happened), and with none intact
the refusal is one line naming each folder."""

from __future__ import annotations

import shutil

import pytest

from helios.train.checkpoint import checkpoint_damage, list_checkpoints
from helios.train.config import ConfigError
from helios.train.trainer import train
from helpers.train_runs import Crash, crash_after


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {"dcp/__0_0.distcp": "dcp/__0_0.distcp is truncated", "dcp/.metadata": "dcp/.metadata is unreadable",
          "trainer_state.pt": "trainer_state.pt is unreadable"}


def test_resume_skips_a_damaged_newest_checkpoint(make_config, tmp_path, capsys):
    over = {"max_steps": 6, "finetune": "full", "checkpointing.keep_last": 5}
    whole = train(make_config("whole", **over))
    with pytest.raises(Crash):  # checkpoints at steps 2 and 4 remain
        train(make_config("crashed", **over), on_step=crash_after(5))
    crashed = tmp_path / "crashed"
    assert [s for s, _ in list_checkpoints(crashed / "checkpoints")] == [2, 4]
    assert checkpoint_damage(crashed / "checkpoints" / "step-00000004") is None

    for i, (name, why) in enumerate(DAMAGE.items()):
        run = tmp_path / f"torn{i}"
        shutil.copytree(crashed, run)
        newest = run / "checkpoints" / "step-00000004"
        truncate(newest / name)
        assert why in checkpoint_damage(newest)
        capsys.readouterr()
        resumed = train(make_config(run.name, **over), resume=True)
        said = capsys.readouterr().out
        assert f"checkpoint {newest} is damaged: {why}" in said, said
        assert f"resuming from {run / 'checkpoints' / 'step-00000002'}, the newest intact checkpoint" in said
        assert resumed.step == 6 and resumed.losses == whole.losses[2:], name


def test_resume_with_every_checkpoint_damaged_is_one_clear_refusal(make_config, tmp_path):
    over = {"max_steps": 4, "finetune": "full", "checkpointing.keep_last": 5}
    train(make_config("run", **over))
    ckpts = [p for _, p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert len(ckpts) == 2
    truncate(ckpts[0] / "trainer_state.pt")
    (ckpts[1] / "dcp" / ".metadata").unlink()
    with pytest.raises(ConfigError) as refused:
        train(make_config("run", **{**over, "max_steps": 6}), resume=True)
    message = str(refused.value)
    assert message.startswith(f"cannot resume: no intact checkpoint in {tmp_path / 'run' / 'checkpoints'}")
    assert "step-00000004 (dcp/.metadata is missing)" in message
    assert "step-00000002 (trainer_state.pt is unreadable" in message and "\n" not in message
