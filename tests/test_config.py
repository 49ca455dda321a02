"""The one schema: params.yaml's values are its defaults, and every key is spelled out there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from arsr.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_params_yaml_values_are_the_schema_defaults() -> None:
    """One set of defaults: change a default in the schema (or a model's dataclass) and in
    params.yaml together, or this fails naming the key."""
    shipped = _flat(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    defaults = _flat(Params().model_dump(mode="json"))
    differ = {k: (shipped[k], defaults[k]) for k in defaults if shipped[k] != defaults[k]}
    assert not differ, f"params.yaml value != schema default: {differ}"


def test_params_yaml_spells_out_every_key() -> None:
    """DVC declares params key by key: each must be in params.yaml, none may be extra."""
    raw = _flat(yaml.safe_load((ROOT / "params.yaml").read_text()))
    defaults = _flat(Params().model_dump(mode="json"))
    assert sorted(raw) == sorted(defaults)


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"srvar": {"model": {"dept": 2}}}, "srvar.model.dept: unknown key"),
        ({"srvar": {"depth": 2}}, "srvar.depth: unknown key"),
        ({"vqvae": {"model": {"patch_nums": [1, 3, 2]}}}, "vqvae.model.patch_nums"),
        ({"mar": {"model": {"encoder_dim": 100, "encoder_heads": 3}}}, "mar.model.encoder_dim"),
        ({"eval": {"srvar": {"cfg": -1}}}, "eval.srvar.cfg"),
        ({"eval": {"srvar_cfg": 1.5}}, "eval.srvar_cfg: unknown key"),
    ],
)
def test_a_bad_key_is_named(raw: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.").replace("[", r"\[")):
        parse_params(raw)


def test_a_partial_train_section_keeps_the_stage_recipe() -> None:
    p = parse_params({"mar": {"train": {"max_steps": 30}}, "vqvae": {"train": {"warmup_steps": 2}}})
    assert p.mar.train.max_steps == 30 and p.mar.train.grad_clip == 3.0  # MAR's recipe
    assert p.vqvae.train.max_steps == 200 and p.vqvae.train.warmup_steps == 2  # the tokenizer's
    r = parse_params({"resources": {"train_mar": {"nproc": 1}}}).resources
    assert (r.train_mar.nproc, r.train_mar.workers) == (1, 2)  # MAR's 2 loader workers stay


def test_machine_settings_live_in_resources_only() -> None:
    """nproc, workers, compile, accum and the encoding and SR batches are the machine's: one place
    each (resources.<stage>), nowhere in the sections stages declare."""
    from arsr.config import TRAINING_STAGES, stage_param_keys

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw["resources"]) == {"shard", "tokenize", *TRAINING_STAGES, "evaluate"}
    science = _flat({k: v for k, v in raw.items() if k != "resources"})
    assert not [k for k in science if k.rsplit(".", 1)[-1] in ("nproc", "workers", "compile", "accum")]
    assert "batch_size" not in raw["eval"]  # tiles have their own seeds: resources.evaluate
    assert "tokenize" not in raw  # its only keys were resources
    every = stage_param_keys(tuple(k for k in Params.model_fields if k != "resources"))
    assert not [k for k in every if k.startswith("resources")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"resources": {"train_srvar": {"nproc": 3}}},
            "srvar.train.batch_size: 32 is not divisible by resources.train_srvar.nproc x accum = 3 x 1",
        ),
        (
            {"resources": {"train_base": {"nproc": 2, "accum": 3}}, "base": {"train": {"batch_size": 33}}},
            "base.train.batch_size: 33 is not divisible by resources.train_base.nproc x accum = 2 x 3",
        ),
        (
            {
                "resources": {"train_mar": {"workers": 8}, "train_srvar": {"nproc": 4}},
                "data": {"min_shards": 1},
            },
            None,
        ),  # (any ranks x workers read any number of shards: the loader reads samples by offset)
        ({"resources": {"train_srvar": {"nprocs": 1}}}, "resources.train_srvar.nprocs: unknown key"),
        ({"srvar": {"train": {"nproc": 1}}}, "srvar.train.nproc: unknown key"),
    ],
)
def test_a_resource_is_checked_with_the_training_it_runs(raw: dict, message: str | None) -> None:
    if message is None:
        parse_params(raw)
        return
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_params(raw)


def test_named_configurations_become_dvc_experiment_overrides(tmp_path: Path) -> None:
    """configs/*.yaml are nested subsets of params.yaml; `python -m arsr.config --overrides FILE`
    checks the merged params and prints dvc exp run's -S arguments."""
    from arsr.config import override_args

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        args = override_args(path, root / "params.yaml")
        assert args[::2] == ["-S"] * (len(args) // 2) and all("=" in a for a in args[1::2])
    args = override_args(root / "configs" / "bsd400.yaml", root / "params.yaml")
    assert "data.source=../shared/data/bsd400" in args and "srvar.train.max_steps=1200" in args
    bad = tmp_path / "bad.yaml"
    bad.write_text("srvar:\n  train:\n    max_stepz: 3\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        override_args(bad, root / "params.yaml")
    lists = tmp_path / "lists.yaml"
    lists.write_text("vqvae:\n  model:\n    patch_nums: [1, 2, 4, 8]\n")
    assert override_args(lists, root / "params.yaml") == ["-S", "vqvae.model.patch_nums=[1, 2, 4, 8]"]
