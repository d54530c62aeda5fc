"""The config system: YAML + dotted overrides into validated dataclasses; every shipped YAML loads."""

from pathlib import Path

import pytest

from lmforge.align.config import AlignConfig
from lmforge.compress.config import CompressConfig
from lmforge.config import load_config
from lmforge.data.prepare import DataPrepConfig
from lmforge.errors import LmforgeError
from lmforge.eval.tasks import load_task
from lmforge.finetune.config import FinetuneConfig
from lmforge.speedrun import SpeedrunConfig, pretrain_config
from lmforge.train.pretrain import PretrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_shipped_yaml_loads(path, tiny_run):
    if path.parent.name == "eval":  # task files, with their own schema (eval/tasks.py)
        assert load_task(str(path)).name == path.stem
        return
    if path.parent.name == "finetune":  # its base run and data are named on the command line
        base, data = tiny_run, Path(__file__).parent / "fixtures/alpaca_20.json"
        assert isinstance(load_config(FinetuneConfig, path, [f"base={base}", f"data.path={data}"]), FinetuneConfig)
        return
    if path.parent.name == "align":  # the runs and data are named on the command line
        data = Path(__file__).parent / "fixtures/alpaca_20.json"
        overrides = [f"policy={tiny_run}", f"data.path={data}", f"ppo.reward={tiny_run}"]
        assert isinstance(load_config(AlignConfig, path, overrides), AlignConfig)
        return
    if path.parent.name == "compress":  # the base run and the calibration text are named on the command line
        text = Path(__file__).parent / "fixtures/tinyshakespeare_120k.txt"
        overrides = [f"base={tiny_run}", f"calibration.path={text}"]
        assert isinstance(load_config(CompressConfig, path, overrides), CompressConfig)
        return
    cfg_cls = {"pretrain": PretrainConfig, "speedrun": SpeedrunConfig, "data": DataPrepConfig}[path.parent.name]
    assert isinstance(load_config(cfg_cls, path), cfg_cls)


def test_overrides_apply_on_top_of_yaml_and_preset():
    cfg = load_config(
        PretrainConfig, "configs/pretrain/tiny.yaml", ["model.n_layers=3", "train.lr=1e-3", "sample.prompts=[a, b]"]
    )
    assert cfg.model.n_layers == 3 and cfg.model.dim == 128  # the preset's width, the override's depth
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.sample.prompts == ["a", "b"]
    assert cfg.run.name == "tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.setps=3", "unknown config key train.setps; did you mean train.steps"),
        ("modle.dim=3", "unknown config key modle; did you mean model"),
        ("train.steps=ten", "train.steps='ten' has the wrong type; expected int"),
        ("train.steps=1.5", "expected int"),
        ("train.dtype=fp8", "choose one of fp32, bf16"),
        ("model.n_heads=5", "model.n_heads=5 must divide model.dim=128"),
        ("train.steps", "not of the form key.sub=value"),
        ("train.steps=0", "train.steps=0 must be positive"),
        ("run.name=a/b", "run.name"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LmforgeError, match="must hold a mapping"):
        load_config(PretrainConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: {dim: [\n")
    with pytest.raises(LmforgeError, match="not valid YAML"):
        load_config(PretrainConfig, tmp_path / "broken.yaml")


def test_byte_tokenizer_needs_its_vocab_size():
    with pytest.raises(LmforgeError, match="model.vocab_size=263"):
        load_config(PretrainConfig, None, ["tokenizer.kind=byte", "model.vocab_size=512"])


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 12])
def test_speedrun_derives_a_valid_config_from_depth(depth):
    cfg = pretrain_config(load_config(SpeedrunConfig, None, [f"depth={depth}"]))
    assert cfg.model.n_layers == depth and cfg.model.dim == 64 * depth
    assert cfg.model.dim % cfg.model.n_heads == 0 and cfg.train.steps > 0
    cfg.model.validate()
    cfg.train.validate()


def test_override_keeps_the_section_factory_values():
    """Overriding one key of a section keeps what its default factory set (the speedrun's run.name)."""
    cfg = load_config(SpeedrunConfig, None, ["run.root=/tmp/elsewhere"])
    assert (cfg.run.name, cfg.run.root) == ("speedrun", "/tmp/elsewhere")
    assert load_config(SpeedrunConfig, None, ["run.name=other"]).run.name == "other"
