"""The facts of a token dataset (DESIGN §3), written once by ``tokenize`` as ``latent_stats.json``.

Every consumer (``train_srvar``, ``train_mar``, and through ``model.pt`` ``evaluate`` and
``arsr upscale``) reads them with :meth:`TokenFacts.read` / :meth:`TokenFacts.from_dict`, which
refuse a file with a missing or unknown key, so no stage guesses a fact another stage knows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from arsr.io import write_json

FACTS_FILE = "latent_stats.json"


class TokenFactsError(ValueError):
    """A token-facts file that is missing, malformed or made for other inputs; names the file."""


@dataclass(frozen=True)
class TokenFacts:
    """What the SR stages need to know about the tokens, and nothing they could re-derive differently."""

    hr_size: int  # HR crop side (px), from the image shards
    scale: int  # SR factor; LR side = hr_size / scale
    num_classes: int  # 0 without labels
    patch_nums: tuple[int, ...]  # the tokenizer's token-map sides; the last is the latent grid
    vocab_size: int
    Cvae: int  # latent channels
    target: str  # what the tokens encode: "hr" (the HR image) or "residual" (HR - base(LR), normalised)
    lr_channels: int  # channels of the LR condition lrf [lr_channels, grid, grid] in the token shards
    vqvae_sha256: str  # of the runs/vqvae/model.pt the tokens were made with
    samples: int  # train samples the stats were measured on
    mean: tuple[float, ...]  # per-channel mean / std of the stored train latents f (float16 as stored)
    std: tuple[float, ...]

    @property
    def grid(self) -> int:
        """The latent grid side h = w."""
        return self.patch_nums[-1]

    @property
    def L(self) -> int:
        """Tokens per sample: sum of pn^2."""
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d | {"patch_nums": list(self.patch_nums), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "token facts") -> TokenFacts:
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise TokenFactsError(
                f"{source}: " + "; ".join(
                    ([f"missing {', '.join(missing)}"] if missing else [])
                    + ([f"unknown {', '.join(unknown)}"] if unknown else [])
                ) + " (made by another version of tokenize: rerun it)"
            )  # fmt: skip
        facts = cls(
            hr_size=int(d["hr_size"]), scale=int(d["scale"]), num_classes=int(d["num_classes"]),
            patch_nums=tuple(int(p) for p in d["patch_nums"]), vocab_size=int(d["vocab_size"]),
            Cvae=int(d["Cvae"]), target=str(d["target"]), lr_channels=int(d["lr_channels"]),
            vqvae_sha256=str(d["vqvae_sha256"]), samples=int(d["samples"]),
            mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
        )  # fmt: skip
        if len(facts.mean) != facts.Cvae or len(facts.std) != facts.Cvae or min(facts.std) <= 0:
            raise TokenFactsError(f"{source}: mean/std must hold {facts.Cvae} values, std > 0")
        if facts.target not in ("hr", "residual") or facts.lr_channels < 1:
            raise TokenFactsError(f"{source}: target must be hr or residual and lr_channels >= 1")
        if facts.hr_size % facts.scale:
            raise TokenFactsError(f"{source}: hr_size {facts.hr_size} is not a multiple of {facts.scale}")
        return facts

    @classmethod
    def read(cls, tokens_dir: str | Path) -> TokenFacts:
        path = Path(tokens_dir) / FACTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (run the tokenize stage first)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise TokenFactsError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(d, str(path))

    def write(self, tokens_dir: str | Path) -> None:
        write_json(Path(tokens_dir) / FACTS_FILE, self.to_dict())
