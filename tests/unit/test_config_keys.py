"""Every key of the config tree is read by production code: a field nothing reads is a dead key, a
setting a user can change to no effect (as `model.gradient_checkpointing` was, while the learner read
another key).

Reads the source with `ast`, like `test_import_rules.py`: a field of a section counts as read when
some module of shared/, learner/, actors/ or deploy/ loads it as `section.name` (`cfg.model.dtype`),
or loads `.name` while handling that section (the module also reads `.section` or names the
section's class: `lc = cfg.learner; lc.actor_lr`, `def f(sync: SyncConfig)`); `getattr(x, "name")`
counts as `.name`. The validation in `shared/config.py`'s `__post_init__` methods does not count:
checking a value is not using it. The match is by names, not types, so a key whose name another
attribute of such a module shares can hide; what it catches is a key that nothing reads at all.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from shared import config

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("shared", "learner", "actors", "deploy")


@dataclasses.dataclass(frozen=True)
class Key:
    dotted: str
    """`learner.micro_batch_tokens`."""
    name: str
    """`micro_batch_tokens`."""
    section: str | None
    """`learner`: the field of VapoConfig holding its section (None for VapoConfig's own fields)."""
    owner: str
    """`LearnerConfig`: the dataclass that declares it."""


def _keys(cls: type, section: str | None = None, prefix: str = "") -> list[Key]:
    """Every field of the tree under `cls`, sections included."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(Key(prefix + f.name, f.name, section, cls.__name__))
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], section or f.name, f"{prefix}{f.name}.")
    return out


@dataclasses.dataclass
class Reads:
    """What one module reads."""

    attrs: set[str] = dataclasses.field(default_factory=set)
    """Attribute names loaded (`x.name`) or named in a `getattr`."""
    pairs: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    """(outer, inner) of chains `....outer.inner`."""
    names: set[str] = dataclasses.field(default_factory=set)
    """Plain names (a section's class named in an annotation counts)."""

    def read(self, key: Key) -> bool:
        """`key` is read here: as `section.name`, or as `.name` in a module that handles that section
        (reads `.section` or names its class); VapoConfig's own fields as any `.name`."""
        if key.section is None:
            return key.name in self.attrs
        in_section = key.section in self.attrs or key.owner in self.names
        return (key.section, key.name) in self.pairs or (key.name in self.attrs and in_section)


def _reads(tree: ast.AST) -> Reads:
    out = Reads()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            out.attrs.add(node.attr)
            if isinstance(node.value, ast.Attribute):
                out.pairs.add((node.value.attr, node.attr))
        elif isinstance(node, ast.Name):
            out.names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.names.add(node.value)  # string annotations (`from __future__ import annotations` keeps them parsed)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            out.attrs.add(str(node.args[1].value))
    return out


def _without_validation(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            node.body = [n for n in node.body if not (isinstance(n, ast.FunctionDef) and n.name == "__post_init__")]
    return tree


def _module_reads() -> list[Reads]:
    return [_reads(_without_validation(ast.parse(path.read_text(), filename=str(path))))
            for package in PRODUCTION for path in sorted((ROOT / package).rglob("*.py"))]


def test_the_tree_has_keys_to_check() -> None:
    keys = {key.dotted: key for key in _keys(config.VapoConfig)}
    assert len(keys) > 100 and keys["learner"].section is None and keys["seed"].section is None
    assert (keys["learner.micro_batch_tokens"].section, keys["learner.micro_batch_tokens"].owner) == \
        ("learner", "LearnerConfig")


def test_every_config_key_is_read_by_production_code() -> None:
    modules = _module_reads()
    dead = [key.dotted for key in _keys(config.VapoConfig) if not any(m.read(key) for m in modules)]
    assert not dead, f"config keys that no production code reads: {dead}"


def test_a_key_read_only_by_its_validation_or_in_another_section_counts_as_dead() -> None:
    source = (
        "class LearnerConfig:\n    def __post_init__(self):\n        check(self.only_validated)\n"
        "def f(cfg, lc: 'LearnerConfig'):\n    return cfg.learner.chained, lc.bare, getattr(lc, 'by_name'), cfg.seed\n"
        "def g(cfg):\n    return cfg.queue.elsewhere\n"
    )
    reads = _reads(_without_validation(ast.parse(source)))
    learner_key = lambda name: Key(f"learner.{name}", name, "learner", "LearnerConfig")  # noqa: E731
    for name in ("chained", "bare", "by_name"):
        assert reads.read(learner_key(name)), name
    assert reads.read(Key("seed", "seed", None, "VapoConfig"))
    assert not reads.read(learner_key("only_validated"))
    assert not reads.read(Key("model.elsewhere", "elsewhere", "model", "ModelConfig"))
